"""Flow-controlled byte pipes between an SSH channel and a TCP connection.

Conch's channels buffer without bound and grant window as soon as data
arrives. Here each direction has real backpressure:

- channel -> TCP: the channel grants window (`adjustWindow`) only for bytes
  the TCP transport has taken while it is not asking us to pause (we are its
  IPushProducer), so a slow TCP reader holds at most one window in the hub.
- TCP -> channel: when the peer's window is used up Conch calls
  `stopWriting`, and we pause reading the TCP socket until `startWriting`.

Half-close is carried both ways: TCP read EOF becomes channel EOF, channel EOF
becomes a TCP write shutdown; the pipe closes once both sides are done.

While the device confirms the channel, the TCP side is read up to
`EARLY_LIMIT` bytes (then paused): a client's first request usually arrives
before the confirmation and goes into the tunnel as the channel opens, with
no pause and resume of the socket (two `epoll_ctl`) and no reactor turn in
between. What a refused channel's client sent is dropped with its connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.conch.ssh import channel
from twisted.internet import protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from hub.ssh.channels import MAX_PACKET, WINDOW, PacketWriteMixin, open_failure_text
from hub.ssh.tcpwrite import closeNow, no_delay, shutdownWriteNow, writeNow
from hub.tunnel.traffic import Traffic

log = Logger()

READ_SIZE = 256 * 1024
# What the TCP side may send before the channel is open: kept, then reading pauses.
EARLY_LIMIT = MAX_PACKET


@implementer(IPushProducer)
class SpliceChannel(PacketWriteMixin, channel.SSHChannel):
    """The SSH end of a pipe; `tcp` is the `TCPEnd` on the other side."""

    manages_window = True
    is_open = False  # the device confirmed the channel
    data_views = True
    conn: Any
    # Set by NodeTunnel.dial: the hub's count of bytes through tunnels.
    traffic: Traffic | None = None

    def __init__(self, tcp: TCPEnd, name: bytes, *, remote_window: int = 0,
                 remote_max_packet: int = 0, on_close: Callable[[int, int], None] | None = None,
                 ) -> None:
        channel.SSHChannel.__init__(
            self, localWindow=WINDOW, localMaxPacket=MAX_PACKET,
            remoteWindow=remote_window, remoteMaxPacket=remote_max_packet)
        self.name = name
        self.tcp = tcp
        tcp.channel = self
        self._unacked = 0
        self._paused = False
        self._eof_sent = False
        self._pending: bytearray | None = None
        self.bytes_in = 0   # from the channel to TCP
        self.bytes_out = 0  # from TCP to the channel
        self._on_close = on_close

    # -- lifecycle ---------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        self.is_open = True
        if self.tcp.read_closed and self.tcp.write_closed:
            self.loseConnection()  # the TCP side died while the device was opening
            return
        self.tcp.transport.registerProducer(self, True)
        early = self.tcp.take_early()
        if early:
            self.tcp_data(early)
        if self.tcp.read_closed:
            self.tcp_eof()  # the client sent its EOF already
        elif not self.buf:  # else the device's window is full: startWriting resumes
            self.tcp.resume()

    def openFailed(self, reason: Any) -> None:
        log.info("{name} channel open failed: {why}", name=self.name.decode(),
                 why=open_failure_text(reason))
        self.closed()

    def _tcp_done_writing(self) -> Any:
        """No more data for TCP: unregister as its producer first, or Twisted
        never finishes a close while our production is paused."""
        transport = self.tcp.transport
        if transport is not None and transport.producer is self:
            transport.unregisterProducer()
        return transport

    def closed(self) -> None:
        self._flush()
        transport = self._tcp_done_writing()
        if transport is not None and not closeNow(transport):
            transport.loseConnection()
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback(self.bytes_in, self.bytes_out)

    def closeReceived(self) -> None:
        # Conch's, less its "remote close" info line for every connection.
        self.loseConnection()

    # -- channel -> TCP ----------------------------------------------------

    def dataReceived(self, data: bytes | memoryview) -> None:
        # `data` may be a view of the transport's packet buffer (data_views),
        # valid only now. What the packets of one read carry is gathered and
        # written with one system call once they are all dispatched.
        self.bytes_in += len(data)
        if self._pending is not None:
            self._pending += data
        elif (self._sink or self.packet_sink()).callAfterInput(self._flush):
            self._pending = bytearray(data)
        else:
            self._to_tcp(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self._to_tcp(pending)

    def _to_tcp(self, data: bytes | bytearray | memoryview) -> None:
        if self.tcp.transport is not None:
            writeNow(self.tcp.transport, data)
        if self.traffic is not None:
            self.traffic.from_device += len(data)  # per batch written, not per packet
        # Window only for what TCP has now taken (queued in Twisted counts: it
        # pauses us past its buffer size, and then no window is granted).
        self._unacked += len(data)
        self._grant()

    def _grant(self) -> None:
        # Grant window only for data the TCP side took while not pushing
        # back; in batches, as OpenSSH does, not per packet.
        if self._paused or self.closing or self._unacked < WINDOW // 4:
            return
        granted, self._unacked = self._unacked, 0
        self.conn.adjustWindow(self, granted)  # also credits localWindowLeft

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._grant()

    def stopProducing(self) -> None:
        self._paused = True

    def eofReceived(self) -> None:
        self._flush()
        transport = self._tcp_done_writing()
        # The TCP side may be gone already (reset by its peer): nothing to shut.
        if (transport is not None and not transport.disconnecting
                and getattr(transport, "connected", True)
                and not shutdownWriteNow(transport)):  # at once when nothing is queued
            if hasattr(transport, "loseWriteConnection"):
                transport.loseWriteConnection()
            else:
                transport.loseConnection()
        self.tcp.write_closed = True
        self._maybe_close()

    # -- TCP -> channel ----------------------------------------------------

    def tcp_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.traffic is not None:
            self.traffic.to_device += len(data)
        self.write(data)

    def stopWriting(self) -> None:
        self.tcp.pause()

    def startWriting(self) -> None:
        self.tcp.resume()

    def tcp_eof(self) -> None:
        if not self.is_open:
            return  # channelOpen sends it, after the early data
        # EOF and, when the device is done too, CLOSE: one send, not two.
        sink = self._sink or self.packet_sink()
        batched = sink.beginBatch()
        try:
            if not self._eof_sent and not self.closing:
                self._eof_sent = True
                # Conch sends EOF at once; the write buffer must drain first.
                if self.buf:
                    self._eof_after_buffer = True
                else:
                    self.conn.sendEOF(self)
            self._maybe_close()
        finally:
            if batched:
                sink.endBatch()

    def addWindowBytes(self, data: int) -> None:
        channel.SSHChannel.addWindowBytes(self, data)
        if getattr(self, "_eof_after_buffer", False) and not self.buf:
            self._eof_after_buffer = False
            self.conn.sendEOF(self)
            self._maybe_close()

    def _maybe_close(self) -> None:
        if self.tcp.write_closed and self.tcp.read_closed and not self.buf:
            self.loseConnection()

    def tcp_lost(self) -> None:
        # Not open (yet): channelOpen closes it; refused: there is nothing to close.
        if self.is_open:
            self.loseConnection()


@implementer(IHalfCloseableProtocol)
class TCPEnd(protocol.Protocol):
    """The TCP end of a pipe; until the channel is open, what it reads is kept
    (at most `EARLY_LIMIT` bytes and one read, then reading pauses)."""

    transport: Any
    channel: SpliceChannel | None = None
    on_connect: Callable[[], None] | None = None
    read_closed = False
    write_closed = False
    _paused = False
    _early: bytes | None = None

    def connectionMade(self) -> None:
        # Read up to READ_SIZE per system call: a bulk sender's data then
        # goes out as several channel packets in one write (see
        # SpliceChannel.write). Twisted also pauses its producer only past
        # this many bytes queued, so it bounds the TCP write side too.
        self.transport.bufferSize = READ_SIZE
        no_delay(self.transport)
        if self.on_connect is not None:
            self.on_connect()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.read_closed:
            self._paused = False
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        channel = self.channel
        if channel is not None and channel.is_open:
            channel.tcp_data(data)
            return
        # Rarely more than one read: joined only then (and bounded).
        self._early = data if self._early is None else self._early + data
        if len(self._early) >= EARLY_LIMIT:
            self.pause()  # the rest waits in the socket until the channel opens

    def take_early(self) -> bytes | None:
        """What arrived before the channel opened (once)."""
        early, self._early = self._early, None
        return early

    def readConnectionLost(self) -> None:
        self.read_closed = True
        if self.channel is not None:
            self.channel.tcp_eof()

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason: Any = None) -> None:
        self.read_closed = self.write_closed = True
        if self.channel is not None:
            self.channel.tcp_lost()
