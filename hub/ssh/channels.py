"""How the hub's channels write: Conch's window rules, without its copies.

`PacketWriteMixin` seals each packet's data straight from the caller's buffer
into the transport's packet buffer; `gather_output` lets a relay send the
packets of one read with one system call. Shared by the splice (channel <->
TCP) and the relay (channel <-> channel). Both reach the transport through its
`IPacketSink` only (see hub.ssh.sink).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from twisted.conch.ssh.connection import MSG_CHANNEL_DATA

from hub.ssh.sink import IPacketSink, sink_for

# The window and packet size the hub offers on the channels it relays.
WINDOW = 2 * 1024 * 1024
MAX_PACKET = 32768
_CHANNEL_DATA_HEAD = struct.Struct(">2L")  # recipient channel, data length


def gather_output(sink: IPacketSink) -> None:
    """Gather the packets sent to `sink` until the data being received is all
    dispatched, then send them with one system call (a relay passes on
    several packets per read; each would be a send of its own)."""
    if not sink.beginBatch():
        return  # not our transport, or a batch is already gathering
    if not sink.callAfterInput(sink.endBatch):
        sink.endBatch()  # nothing is being received: nothing to gather


class PacketWriteMixin:
    """`write` for an SSHChannel subclass: Conch's rules, no copies (see write)."""

    buf: bytes
    closing: int
    conn: Any
    localClosed: int
    remoteWindowLeft: int
    remoteMaxPacket: int
    areWriting: int
    stopWriting: Callable[[], None]
    loseConnection: Callable[[], None]
    _sink: IPacketSink | None = None

    def packet_sink(self) -> IPacketSink:
        """The `IPacketSink` of this channel's transport (found once: the
        channel is open, so its `conn` is set)."""
        sink = self._sink
        if sink is None:
            sink = self._sink = sink_for(self.conn.transport)
        return sink

    def write(self, data: bytes | memoryview) -> None:
        # Conch's SSHChannel.write (same window and buffer rules), except
        # that each packet's data is a view of `data`, framed by the
        # transport straight into its packet buffer: Conch slices it and its
        # sendData and sendPacket join it to headers, 4 copies per packet.
        # `data` may be a view valid only now: what waits for window is a copy.
        if self.buf:
            self.buf += data
            return
        top = len(data)
        if top > self.remoteWindowLeft:
            self.buf = bytes(data[self.remoteWindowLeft :])
            data = data[: self.remoteWindowLeft]
            self.areWriting = 0
            self.stopWriting()
            top = self.remoteWindowLeft
        rmp = self.remoteMaxPacket
        view = memoryview(data)
        sink = self._sink or self.packet_sink()
        if top <= rmp:
            self._send_data(sink, view[:top])
        else:
            # Several packets from one read: written with one system call,
            # and sealed with one call of the C packet layer where it can.
            batched = sink.beginBatch()
            try:
                if not self.localClosed and not sink.sendChannelData(
                        self.conn.channelsToRemoteChannel[self], view[:top], rmp):
                    for offset in range(0, top, rmp):
                        self._send_data(sink, view[offset : offset + rmp])
            finally:
                if batched:
                    sink.endBatch()
        self.remoteWindowLeft -= top
        if self.closing and not self.buf:
            self.loseConnection()  # try again

    def _send_data(self, sink: IPacketSink, chunk: memoryview) -> None:
        if not self.localClosed:  # as conn.sendData
            head = _CHANNEL_DATA_HEAD.pack(
                self.conn.channelsToRemoteChannel[self], len(chunk))
            sink.sendPacketParts(MSG_CHANNEL_DATA, head, chunk)


_OPEN_FAILURES = {1: "administratively prohibited", 2: "connect failed",
                  3: "unknown channel type", 4: "resource shortage"}


def open_failure_text(reason: object) -> str:
    """A channel-open refusal (Conch's `ConchError(description, code)`) as words:
    `connect failed: Connection refused`, not `(b'Connection refused', 2)`."""
    args: tuple[object, ...] = tuple(getattr(reason, "args", ()))
    if len(args) == 2 and isinstance(args[1], int):
        text = args[0].decode("utf-8", "replace") if isinstance(args[0], bytes) else str(args[0])
        kind = _OPEN_FAILURES.get(args[1], f"code {args[1]}")
        return kind if text in ("", kind) else f"{kind}: {text}"
    return str(reason)
