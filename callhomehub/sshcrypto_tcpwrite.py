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

Used for the SSH transport only.  A send error swallowed here is reported
by Twisted's next send, but it is consumed from the socket (a reset may
then read as a clean EOF), which a half-closeable protocol such as the
splice's TCP end would take for a half-close.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

from callhomehub.sshcrypto_buffers import Bytes


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
        except OSError:
            # Full (EAGAIN) or broken: queue it all; Twisted's own send then
            # waits for room or reports the error and closes the connection.
            sent = 0
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    transport.write(data if type(data) is bytes else bytes(data))
