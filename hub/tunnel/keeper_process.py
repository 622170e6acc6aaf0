"""The port keeper process (`python -I -S .../keeper_process.py FD`).

Standard library only: it holds the forward listeners the hub hands it over
the socketpair on descriptor FD and passes back what they accept; see
`hub.tunnel.keeper` for why and for the messages. It exits when the
hub's end closes.
"""

from __future__ import annotations

import array
import errno
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time

MSG = struct.Struct(">cL")    # kind, port id
ERR = struct.Struct(">cLL")   # b"E", port id, errno
FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
# The hub hands over the listening sockets of one reactor turn in one message, at
# most this many (each K record takes the next descriptor): a send that wakes
# this process costs the hub some 30 us, one per forward in a reconnect storm.
HANDOVER_BATCH = 64
HANDOVER_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize * HANDOVER_BATCH)
ACCEPTS_PER_WAKEUP = 64
# After a failed accept (EMFILE, ENFILE, ENOBUFS) a port rests this long, or
# the still-pending connection would wake the loop again at once, forever.
ACCEPT_PAUSE = 0.5
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Descriptors kept free for accepting (each accepted connection is passed on
# and closed at once) and for a message's descriptor in flight.
ACCEPT_RESERVE = 8


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def with_fd(*fds: int) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing `fds`."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class Keeper:
    def __init__(self, control: socket.socket) -> None:
        control.setblocking(True)  # sends wait for the hub: backpressure on accepts
        self.control = control
        self.selector = selectors.DefaultSelector()
        self.selector.register(control, selectors.EVENT_READ, None)
        self.ports: dict[int, socket.socket] = {}
        self.resting: dict[int, float] = {}  # port id -> when to listen again
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.limit = soft if soft != resource.RLIM_INFINITY else 1 << 30
        try:
            self.base_fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            self.base_fds = 16

    def serve(self) -> int:
        """Runs until the hub's end closes."""
        while True:
            timeout = (max(0.0, min(self.resting.values()) - time.monotonic())
                       if self.resting else None)
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    if not self.from_hub():
                        return 0
                elif key.data in self.ports:
                    self.accept(key.data)
            self.wake_rested()

    def from_hub(self) -> bool:
        while True:
            try:
                msg, ancdata, _flags, _addr = self.control.recvmsg(
                    MSG.size * HANDOVER_BATCH, HANDOVER_FD_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except ConnectionError:
                return False
            if not msg:
                return False
            fds = fds_of(ancdata)
            fds.reverse()  # each K record takes the next one: pop() from the end
            try:
                for at in range(0, len(msg) - len(msg) % MSG.size, MSG.size):
                    kind, ident = MSG.unpack_from(msg, at)
                    self.record(kind, ident, fds)
            finally:
                for fd in fds:  # nothing else carries a descriptor
                    os.close(fd)

    def record(self, kind: bytes, ident: int, fds: list[int]) -> None:
        """One record of a message from the hub; a K takes the next descriptor."""
        fd = fds.pop() if kind == b"K" and fds else None
        if fd is not None and self.room():
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.ports[ident] = sock
            self.selector.register(sock, selectors.EVENT_READ, ident)
        elif kind == b"K":
            # At our open-file limit (or the kernel dropped the descriptor for
            # that): refuse, keeping room to accept on the ports we hold.
            if fd is not None:
                os.close(fd)
            self.control.sendmsg([ERR.pack(b"F", ident, errno.EMFILE)])
        elif kind == b"C":
            self.close(ident)
            self.control.sendmsg([MSG.pack(b"c", ident)])

    def room(self) -> bool:
        """Whether one more listener leaves ACCEPT_RESERVE descriptors free."""
        return self.base_fds + len(self.ports) + 1 + ACCEPT_RESERVE <= self.limit

    def close(self, ident: int) -> None:
        sock = self.ports.pop(ident, None)
        if sock is None:
            return
        if self.resting.pop(ident, None) is None:
            self.selector.unregister(sock)
        sock.close()

    def accept(self, ident: int) -> None:
        listening = self.ports[ident]
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _addr = listening.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno not in OUT_OF_RESOURCES:
                    continue  # that connection's trouble (aborted, ...): the next one
                self.control.sendmsg([ERR.pack(b"E", ident, e.errno or 0)])
                self.selector.unregister(listening)
                self.resting[ident] = time.monotonic() + ACCEPT_PAUSE
                return
            try:
                self.control.sendmsg([MSG.pack(b"A", ident)], with_fd(conn.fileno()))
            except OSError as e:
                if isinstance(e, ConnectionError):
                    raise  # the hub is gone
                # ETOOMANYREFS, ENOBUFS: this connection is lost, the keeper goes on.
                self.control.sendmsg([ERR.pack(b"E", ident, e.errno or 0)])
            finally:
                conn.close()

    def wake_rested(self) -> None:
        now = time.monotonic()
        for ident, when in list(self.resting.items()):
            if when <= now:
                del self.resting[ident]
                self.selector.register(self.ports[ident], selectors.EVENT_READ, ident)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The hub stops it by closing the socketpair; a terminal's ^C is the hub's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return Keeper(socket.socket(fileno=int(args[0]))).serve()
    except (BrokenPipeError, ConnectionError):
        return 0  # the hub went away while we were telling it something


if __name__ == "__main__":
    sys.exit(main())
