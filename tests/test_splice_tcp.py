"""The splice's TCP end on a real socket: channel EOF and close without extra reactor turns.

A `tcp.Connection` over a socketpair, driven by a MemoryReactorClock: what
the peer socket sees tells whether the hub shut its write side at once.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.testing import MemoryReactorClock

from hub.ssh.tcpwrite import closeNow, shutdownWriteNow
from hub.tunnel.splice import SpliceChannel, TCPEnd


def _connection() -> tuple[tcp.Connection, TCPEnd, socket.socket, MemoryReactorClock]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    clock = MemoryReactorClock()
    end = TCPEnd()
    conn = tcp.Connection(ours, end, clock)
    conn.connected = True
    end.makeConnection(conn)
    return conn, end, theirs, clock


def test_channel_eof_shuts_the_tcp_write_side_at_once() -> None:
    conn, end, theirs, clock = _connection()
    splice = SpliceChannel(end, b"forwarded-tcpip")
    splice.eofReceived()
    # The peer reads EOF now: no reactor turn, no registration for writing.
    assert theirs.recv(10) == b""
    assert conn not in clock.getWriters()
    assert end.write_closed and not end.read_closed
    # Still readable: the other direction goes on.
    assert conn._writeDisconnected and not conn.disconnecting
    # With the write side shut, closing the connection is immediate too.
    conn.loseConnection()
    assert end.read_closed and conn.disconnected


def test_queued_data_goes_out_before_the_shutdown() -> None:
    conn, _end, theirs, clock = _connection()
    conn.write(b"queued")  # Twisted's buffer: only its doWrite may shut after it
    assert not shutdownWriteNow(conn)
    conn.loseWriteConnection()
    assert conn in clock.getWriters()
    conn.doWrite()
    assert theirs.recv(10) == b"queued"
    assert theirs.recv(10) == b""


def test_a_registered_producer_keeps_twisted_s_own_half_close() -> None:
    conn, _end, _theirs, _clock = _connection()

    class Producer:
        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    producer: Any = Producer()
    conn.registerProducer(producer, True)
    assert not shutdownWriteNow(conn)
    assert not conn._writeDisconnected


def test_close_after_both_eofs_is_immediate_and_clean() -> None:
    conn, end, theirs, clock = _connection()
    reasons: list[Any] = []
    lost = end.connectionLost
    end.connectionLost = lambda reason=None: (reasons.append(reason), lost(reason))  # type: ignore[method-assign]
    splice = SpliceChannel(end, b"forwarded-tcpip")
    splice.eofReceived()  # the device's EOF: the write side shut at once
    assert closeNow(conn)
    # Closed now, as Twisted's loseConnection would, with a clean ConnectionDone.
    assert conn.disconnected and not conn.connected
    assert conn not in clock.getReaders() and conn not in clock.getWriters()
    assert len(reasons) == 1 and reasons[0].check(error.ConnectionDone)
    assert end.read_closed and end.write_closed
    assert theirs.recv(10) == b""
    assert not closeNow(conn)  # once


def test_close_now_leaves_an_open_write_side_to_twisted() -> None:
    conn, _end, _theirs, _clock = _connection()
    assert not closeNow(conn)  # the write side is open: loseConnection flushes first
    assert conn.connected and not conn.disconnecting
    conn.write(b"queued")
    conn.loseWriteConnection()
    assert not closeNow(conn)
