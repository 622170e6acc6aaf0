"""
L{writeNow}: hand bytes to a TCP socket at once when nothing is queued.

Twisted's C{write} always queues: the bytes wait in a list until the reactor
reports the socket writable, are joined into one string (a copy) and sent,
and the writer is registered with epoll for that (C{epoll_ctl} to add, and to
remove once the queue drains) on every write.  A bulk transfer through the
hub pays that for every packet although a loopback or LAN socket nearly
always has room.  Here, while the transport's queue is empty, the bytes go
straight to C{send}; what the socket does not take is queued with
C{transport.write} as before, and so keeps its order and lets Twisted pause
producers and report errors.

A send error other than "no room" is consumed from the socket: Twisted's
next send would report it, but a read may see the reset as a clean EOF
first, which a half-closeable protocol (the splice's TCP end) would take
for a half-close.  So such an error aborts the connection here at once:
reading stops, and C{connectionLost} follows in the next reactor turn, as
it would have from Twisted's own failed send.

L{OutputBatch} lets a sender frame several packets into one buffer and hand
them to L{writeNow} together: one C{send} instead of one per packet.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure

from hub.ssh.buffers import Bytes


def _idle(transport: Any) -> bool:
    """
    Whether C{transport} is a plain, open TCP connection with nothing queued.
    """
    return bool(
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def writeNow(transport: Any, data: Bytes) -> None:
    """
    Write C{data} (which may be a view of a buffer the caller reuses) to
    C{transport}, sending it at once if the transport is idle.
    """
    if _idle(transport):
        try:
            sent = transport.socket.send(data)
        except OSError as e:
            if e.errno not in _NO_ROOM:
                transport.abortConnection()
                return
            sent = 0  # full: queue it all; Twisted sends it when there is room
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    transport.write(data if type(data) is bytes else bytes(data))


_NO_ROOM = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)


def no_delay(transport: Any) -> None:
    """
    TCP_NODELAY on C{transport} if it is TCP.  The hub writes what one read
    brought with one send already; Nagle would only hold a connection's last
    small segment (a reply, an EOF, a channel open, a window adjust) until
    the peer's delayed ACK, 40 ms on Linux, for every short request.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:  # not contextlib.suppress: three calls more, for every connection
            set_no_delay(True)
        except OSError:
            pass


# Room for the channel packets of one 256 KiB read (the hub's TCP reads, see
# hub.tunnel.splice): eight 32 KiB packets plus their framing and MACs. At
# exactly 256 KiB the eighth packet did not fit and went out in a second send.
BATCH_SIZE = 256 * 1024 + 8 * 1024


class OutputBatch:
    """
    Packets framed back to back into one buffer, then written together.

    One per L{hub.ssh.iogroup.IOGroup}: the reactor is single-threaded and
    a batch is written out before L{end} returns, so a batch never outlives
    the call that began it.  A batch begun while one is open (a write that
    causes a write on another connection) is refused, and its packets go out
    one by one.
    """

    def __init__(self, size: int = BATCH_SIZE) -> None:
        self._size = size
        self._view = memoryview(b"")
        self._used = 0
        self._transport: Any = None

    def begin(self, transport: Any) -> bool:
        """
        Collect what is sent to C{transport} until L{end}; whether this
        call opened the batch (only then must it call L{end}).
        """
        if self._transport is not None or not _idle(transport):
            return False
        if not self._view:
            self._view = memoryview(bytearray(self._size))
        self._transport = transport
        self._used = 0
        return True

    def collecting(self, transport: Any) -> bool:
        return self._transport is transport and transport is not None

    def take(self, size: int) -> memoryview:
        """
        Room for one packet of at most C{size} bytes; L{commit} says how
        much of it was used.  A full batch is written out first.
        """
        if self._used + size > len(self._view):
            self.flush()
            if size > len(self._view):
                return memoryview(bytearray(size))  # one oversized packet
        return self._view[self._used :]

    def commit(self, wire: memoryview) -> None:
        """
        Count C{wire}, the packet framed into what L{take} returned.
        """
        if wire.obj is self._view.obj:
            self._used += len(wire)
        else:  # the oversized packet of take()
            self.flush()
            writeNow(self._transport, wire)

    def flush(self) -> None:
        if self._used:
            used, self._used = self._used, 0
            writeNow(self._transport, self._view[:used])

    def end(self) -> None:
        try:
            self.flush()
        finally:
            self._transport = None



def shutdownWriteNow(transport: Any) -> bool:
    """
    Half-close C{transport} (a C{shutdown(SHUT_WR)}) at once if it is a plain
    TCP connection with nothing queued and no producer: what Twisted's
    C{loseWriteConnection} does a reactor turn later, after registering the
    socket for writing (two C{epoll_ctl}, a wake-up and an empty C{send}).
    Once the write side is closed, Twisted's C{loseConnection} closes at once
    too.  False: nothing done, use C{loseWriteConnection}.
    """
    if not _idle(transport) or transport.producer is not None:
        return False
    transport._writeDisconnected = True
    transport._closeWriteConnection()  # shutdown, then the protocol's writeConnectionLost
    return True


# One reason for every connection closed by closeNow, as the reactor keeps one
# for the connections it sees end: Twisted's loseConnection builds a new
# Failure for each, and its connectionLost works out that Failure's class
# names (seven reflect.qual calls) to check it was not an abort.
_CONNECTION_DONE = Failure(main.CONNECTION_DONE)


def closeNow(transport: Any) -> bool:
    """
    Close C{transport} at once, as its C{loseConnection} does when the
    write side is shut already (L{shutdownWriteNow}) and nothing is queued:
    stop reading and writing, then C{connectionLost} with a clean
    C{ConnectionDone}.  False: nothing done, use C{loseConnection}.
    """
    if not (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and transport._writeDisconnected
        and not transport.TLS
        and transport.producer is None
    ):
        return False
    transport.stopReading()
    transport.stopWriting()
    transport.connectionLost(_CONNECTION_DONE)
    return True
