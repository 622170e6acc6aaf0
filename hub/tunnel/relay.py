"""Flow-controlled channel <-> channel relays: the console gateway and the jump host.

Bytes from one SSH channel go to another (operator <-> device) with window
granted back only while the other side has room; EOF, exit status and close
wait for buffered data. A channel confirmed only after its peer (the jump
host's operator end waits for the device end and the grant check) is
`relay_pending` until then: what its peer receives meanwhile (the device's
sshd sends its banner as the connection opens) waits for it, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.conch.ssh import channel

from hub.ssh.channels import MAX_PACKET, WINDOW, PacketWriteMixin, gather_output
from hub.tunnel.traffic import Traffic


class RelayMixin:
    """One end of a flow-controlled channel<->channel relay (gateway, jump host).

    Mixed into an SSHChannel subclass. Data from this channel's remote side
    goes to `peer.write`; window is granted back only while the peer's remote
    window has room (its `stopWriting`/`startWriting` hold and release us).
    EOF, exit status and close wait for the peer's buffered data (`after_flush`),
    because Conch would send them ahead of it.
    """

    manages_window = True
    relay_peer: Any = None
    conn: Any
    buf: bytes
    extBuf: list[Any]
    closing: int
    localWindowSize: int
    relay_bytes_in = 0
    _relay_unacked = 0
    _relay_held = False
    _relay_after: list[Callable[[], object]] | None = None
    # True while this channel's open is not yet confirmed but its peer's is.
    relay_pending = False
    _relay_early: list[Callable[[], object]] | None = None

    def relay_received(self, n: int) -> None:
        self.relay_bytes_in += n
        self._relay_unacked += n
        self._relay_grant()

    def _relay_grant(self) -> None:
        if self._relay_held or self.closing or self._relay_unacked < self.localWindowSize // 4:
            return
        granted, self._relay_unacked = self._relay_unacked, 0
        self.conn.adjustWindow(self, granted)

    def relay_hold(self) -> None:
        self._relay_held = True

    def relay_release(self) -> None:
        self._relay_held = False
        self._relay_grant()

    # The peer calls these through its stopWriting/startWriting.
    def stopWriting(self) -> None:
        if self.relay_peer is not None:
            self.relay_peer.relay_hold()

    def startWriting(self) -> None:
        if self.relay_peer is not None:
            self.relay_peer.relay_release()

    def after_flush(self, action: Callable[[], object]) -> None:
        """Run `action` once everything written so far has gone out."""
        if self._relay_after is None:
            self._relay_after = []
        self._relay_after.append(action)
        self._relay_run_after()

    def _relay_run_after(self) -> None:
        while self._relay_after and not self.buf and not self.extBuf:
            self._relay_after.pop(0)()

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)  # type: ignore[misc]
        self._relay_run_after()

    def relay_later(self, action: Callable[[], object]) -> bool:
        """Keep `action` (passing something on to the peer) until the peer's
        channel opens, if it is still opening: True if kept. Kept data is not
        granted back as window, so the device's window bounds what waits."""
        peer = self.relay_peer
        if peer is None or not peer.relay_pending:
            return False
        if self._relay_early is None:
            self._relay_early = []
        self._relay_early.append(action)
        return True

    def relay_peer_opened(self) -> None:
        """The peer's channel is open: pass on what waited for it, in order."""
        early, self._relay_early = self._relay_early or [], None
        for action in early:
            action()


class RelayChannel(RelayMixin, PacketWriteMixin, channel.SSHChannel):
    """A channel relayed byte for byte to `relay_peer`, another RelayChannel.

    Its data may come as views of the transport's packet buffer (`data_views`):
    the peer's `write` seals them straight into its own packets."""

    data_views = True

    on_close: Callable[[], None] | None = None
    # Set by NodeTunnel.dial on the device end: the hub's count of bytes through tunnels.
    traffic: Traffic | None = None

    def __init__(self, name: bytes, **kw: Any) -> None:
        channel.SSHChannel.__init__(self, localWindow=WINDOW, localMaxPacket=MAX_PACKET, **kw)
        self.name = name

    def relay_open(self) -> bool:
        return getattr(self, "conn", None) is not None and not self.closing

    def channelOpen(self, specificData: bytes) -> None:
        if self.relay_pending:
            self.relay_pending = False
            if self.relay_peer is not None:
                self.relay_peer.relay_peer_opened()

    def dataReceived(self, data: bytes) -> None:
        if self.relay_peer is not None and self.relay_peer.relay_pending:
            # A view is valid only during this call: what waits is a copy.
            kept = bytes(data)
            self.relay_later(lambda: RelayChannel.dataReceived(self, kept))
            return
        if self.relay_peer is not None and self.relay_peer.relay_open():
            gather_output(self.relay_peer.packet_sink())
            self.relay_peer.write(data)
        if self.traffic is not None:
            self.traffic.from_device += len(data)
        self.relay_received(len(data))

    def write(self, data: bytes | memoryview) -> None:
        if self.traffic is not None:
            self.traffic.to_device += len(data)
        PacketWriteMixin.write(self, data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        if self.relay_later(lambda: RelayChannel.extReceived(self, dataType, data)):
            return
        if self.relay_peer is not None and self.relay_peer.relay_open():
            self.relay_peer.writeExtended(dataType, data)
        self.relay_received(len(data))

    def eofReceived(self) -> None:
        if self.relay_later(lambda: RelayChannel.eofReceived(self)):
            return
        peer = self.relay_peer
        if peer is not None and peer.relay_open():
            peer.after_flush(lambda: peer.conn.sendEOF(peer) if peer.relay_open() else None)

    def closeReceived(self) -> None:
        # Conch's, less its "remote close" info line for every channel.
        self.loseConnection()

    def closed(self) -> None:
        if not self.relay_later(self._relay_close_peer):
            self._relay_close_peer()
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            callback()

    def _relay_close_peer(self) -> None:
        peer = self.relay_peer
        if peer is not None and peer.relay_open():
            peer.after_flush(peer.loseConnection)
