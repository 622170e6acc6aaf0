"""The device's service and the hub-side client: loopback streams that are timed and checked.

Senders use sendfile(2) from a file of random bytes; receivers recv_into one
large buffer and compare what came with the pattern (a memcmp), so every
transfer is checked byte for byte and the bench's own CPU stays small beside
the servers' on the same cores: hashing everything with SHA-256, as the
receivers did before, kept a third of a core busy at 500 MB/s, with the same
SHA-256 unit the servers' hmac-sha2-256 needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from attrs import define
from common import wait_for

MIB = 1 << 20
PATTERN_SIZE = 16 * MIB
RECV_BUFFER = 4 * MIB
IO_TIMEOUT = 120.0
DIRECTIONS = ("to-device", "from-device")


@define(frozen=True)
class Received:
    count: int
    intact: bool          # every byte was the pattern's byte at its place
    last_byte_at: float


class Pattern:
    """A file of random bytes; a stream of N bytes is the file repeated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = os.urandom(PATTERN_SIZE)
        path.write_bytes(self.data)

    def send(self, sock: socket.socket, size: int) -> None:
        """Send `size` bytes with sendfile(2), then half-close."""
        with open(self.path, "rb") as f:
            left = size
            while left > 0:
                n = min(left, PATTERN_SIZE)
                sock.sendfile(f, 0, n)
                left -= n
        sock.shutdown(socket.SHUT_WR)

    def matches(self, offset: int, data: memoryview) -> bool:
        """Whether `data` is the stream's bytes from `offset` on."""
        at = offset % PATTERN_SIZE
        while data:
            n = min(len(data), PATTERN_SIZE - at)
            # bytes against bytes is a memcmp (about 15 GB/s with the copies here);
            # memoryview against memoryview goes byte by byte (under 1 GB/s).
            if bytes(data[:n]) != self.data[at:at + n]:
                return False
            data, at = data[n:], 0
        return True


def receive(sock: socket.socket, pattern: Pattern) -> Received:
    """Read to EOF, comparing with the pattern; note when the last byte arrived."""
    buffer = bytearray(RECV_BUFFER)
    view = memoryview(buffer)
    intact, count, last = True, 0, time.perf_counter()
    while True:
        n = sock.recv_into(buffer)
        if not n:
            return Received(count, intact, last)
        last = time.perf_counter()
        intact = intact and pattern.matches(count, view[:n])
        count += n


def drain(sock: socket.socket) -> None:
    """Wait for the peer to close (after we sent everything)."""
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


class DeviceEndpoint:
    """The device's service: a loopback server that sinks or sources one stream per job."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self._jobs: list[tuple[Callable[[socket.socket], Any], Future[Any]]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def expect(self, job: Callable[[socket.socket], Any]) -> Future[Any]:
        """Run `job` on the next accepted connection; its result lands in the future."""
        future: Future[Any] = Future()
        with self._lock:
            self._jobs.append((job, future))
        return future

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                job = self._jobs.pop(0) if self._jobs else None
            if job is None:
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, *job), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, job: Callable[[socket.socket], Any],
               future: Future[Any]) -> None:
        conn.settimeout(IO_TIMEOUT)
        try:
            with conn:
                future.set_result(job(conn))
        except BaseException as e:
            future.set_exception(e)

    def close(self) -> None:
        self.sock.close()


def connect(port: int) -> socket.socket:
    """Connect to a forwarded port, retrying briefly while it comes up."""
    def attempt() -> socket.socket | None:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        except ConnectionRefusedError:
            return None
    return wait_for(attempt, 10, f"port {port} to accept")


@define(frozen=True)
class Transfer:
    seconds: float
    count: int
    verified: bool

    def mb_per_s(self) -> float:
        return self.count / self.seconds / 1e6


def transfer(endpoint: DeviceEndpoint, port: int, direction: str, size: int) -> Transfer:
    """One stream of `size` bytes through `port` in `direction`, timed at the receiver."""
    pattern = endpoint.pattern

    def source(conn: socket.socket) -> None:
        pattern.send(conn, size)
        drain(conn)

    def sink(conn: socket.socket) -> Received:
        return receive(conn, pattern)

    if direction == "to-device":
        done = endpoint.expect(sink)
        start = time.perf_counter()
        with connect(port) as sock:
            pattern.send(sock, size)
            got: Received = done.result(IO_TIMEOUT)
    else:
        done = endpoint.expect(source)
        start = time.perf_counter()
        with connect(port) as sock:
            got = receive(sock, pattern)
        done.result(IO_TIMEOUT)
    ok = got.count == size and got.intact
    return Transfer(got.last_byte_at - start, got.count, ok)
