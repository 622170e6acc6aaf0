"""The port keeper: forward listeners held by a helper process (`--port-keeper`).

Every tunnel costs the hub two descriptors, the device's connection and its
forward's listening socket, so a per-process open-file limit of N caps the
hub at about N/2 tunnels. Where that limit cannot be raised (a container
without CAP_SYS_RESOURCE), the hub can hand its listening sockets to this
helper, which holds them and passes each accepted connection back:

- the hub still creates, binds and listens itself (`PortKeeper.listenTCP`,
  the same errors as `reactor.listenTCP`, e.g. EADDRINUSE to move a lease),
  then sends the socket to the keeper over a SOCK_SEQPACKET socketpair
  (SCM_RIGHTS) and closes its own copy;
- the keeper accepts and sends each connection back the same way; the hub
  adopts it into its reactor, so the splice and everything after it is
  unchanged;
- closing a port is a request the keeper confirms once the socket is closed
  (the port is free when `stopListening`'s Deferred fires, as with Twisted).

The keeper is plain Python (no Twisted, a few MiB) and exits when the hub's
end of the socketpair closes, so it never outlives the hub. If it dies, its
ports are gone: the hub logs it, drops the tunnels (devices call back and
get their ports again from a new keeper) and starts a new one.

Messages: records of one byte of kind and a uint32 port id, and descriptors.
hub -> keeper: K (keep this listening socket), C (close it); what one reactor
turn asks for goes in one message of up to `HANDOVER_BATCH` records, each K
taking the next descriptor (a send that wakes the keeper costs some 30 us;
one per forward was 3-4 % of a worker's time in a reconnect storm);
keeper -> hub, one record and at most one descriptor per message: A (accepted
connection), c (closed), E (accept failed; errno), F (could not take a listening
socket, e.g. out of descriptors; errno).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.logger import Logger

from hub.tunnel import keeper_process
from hub.tunnel.keeper_process import ERR, FD_SPACE, HANDOVER_BATCH, MSG, fds_of, with_fd

log = Logger()

RESTART_DELAY = 1.0
MESSAGES_PER_READ = 64


class KeptPort:
    """What `PortKeeper.listenTCP` returns: enough of Twisted's IListeningPort."""

    def __init__(self, keeper: PortKeeper, ident: int, factory: Any, family: int,
                 host: Any) -> None:
        self.keeper = keeper
        self.ident = ident
        self.factory = factory
        self.family = family
        self._host = host
        self._stopped: defer.Deferred[None] | None = None

    def getHost(self) -> Any:
        return self._host

    def stopListening(self) -> defer.Deferred[None]:
        if self._stopped is None:
            self._stopped = defer.Deferred()
            self.keeper._close(self)
        return self._stopped

    def _closed(self) -> None:
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)


class PortKeeper:
    """The hub's end: spawns the keeper and offers `listenTCP` like a reactor's."""

    def __init__(self, reactor: Any, on_lost: Callable[[str], None] | None = None,
                 argv: list[str] | None = None, backlog: int = 128,
                 on_port_lost: Callable[[int], None] | None = None) -> None:
        self.reactor = reactor
        self.on_lost = on_lost
        self.on_port_lost = on_port_lost
        # The keeper is standard library only: run its file without site-packages (-S)
        # or the environment (-I). `-m hub...` went through site and the package's
        # import machinery: about twice the start-up time, and every forward waits
        # for the keeper to start (measured 0.69 s against 0.38 s at a load of 9 on
        # two cores).
        self.argv = argv or [sys.executable, "-I", "-S", keeper_process.__file__]
        self.backlog = backlog
        self._ports: dict[int, KeptPort] = {}
        self._next_id = 1
        self._out: deque[tuple[bytes, socket.socket | None]] = deque()
        self._retry: Any = None
        self._control: socket.socket | None = None
        self._process: Any = None
        self._stopping = False
        self._watch: Any = None
        self._started = float("-inf")
        self._restart: Any = None

    # -- life cycle

    def start(self) -> None:
        self._restart = None
        self._started = self.reactor.seconds()
        try:
            self._spawn()
        except Exception as e:  # EMFILE above all: the situation --port-keeper is for
            log.error("cannot start the port keeper ({why}); trying again in {delay} s",
                      why=e, delay=RESTART_DELAY)
            self._watch = None
            self._restart = self.reactor.callLater(RESTART_DELAY, self.start)
            return
        self._flush()

    def _spawn(self) -> None:
        hub_end, keeper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        hub_end.setblocking(False)
        keeper = self

        class Watch(protocol.ProcessProtocol):
            def errReceived(self, data: bytes) -> None:
                for line in data.decode("utf-8", "replace").splitlines():
                    log.warn("port keeper: {line}", line=line)

            def processEnded(self, reason: Any) -> None:
                keeper._lost(f"port keeper exited ({reason.value})", self)

        self._watch = Watch()
        try:
            self._process = self.reactor.spawnProcess(
                self._watch, self.argv[0], [*self.argv, "3"], env=dict(os.environ),
                childFDs={0: "w", 1: "r", 2: "r", 3: keeper_end.fileno()})
        except BaseException:
            hub_end.close()
            raise
        finally:
            keeper_end.close()
        self._control = hub_end
        self.reactor.addReader(self)
        log.info("port keeper started (pid {pid})", pid=self._process.pid)

    def stop(self) -> None:
        """Close the socketpair: the keeper exits, and its ports with it."""
        self._stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._drop_control()
        self._release_ports()

    def _drop_control(self) -> None:
        if self._control is not None:
            self.reactor.removeReader(self)
            self._control.close()
            self._control = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        while self._out:  # what was on its way to the keeper goes with it
            _msg, sock = self._out.popleft()
            if sock is not None:
                sock.close()

    def _release_ports(self) -> None:
        """The keeper holding them is gone: every port is closed now."""
        ports, self._ports = self._ports, {}
        for port in ports.values():
            port._closed()

    def _lost(self, why: str, watch: Any = None) -> None:
        if watch is not None and watch is not self._watch:
            return  # an earlier keeper's end, already handled
        if self._stopping:
            return
        log.error("{why}: its ports are gone; dropping the tunnels and starting "
                  "a new one", why=why)
        self._drop_control()
        self._release_ports()
        if self._process is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self._process.signalProcess("KILL")
        self._watch = None
        # One that dies at once is not restarted in a tight loop; listens meanwhile
        # wait in the queue (their sockets bound) and go to the new keeper.
        soon = self.reactor.seconds() - self._started < RESTART_DELAY
        self._restart = self.reactor.callLater(RESTART_DELAY if soon else 0, self.start)
        if self.on_lost is not None:
            self.on_lost(why)

    # -- what the tunnels use

    def listenTCP(self, port: int, factory: Any, backlog: int = 0,
                  interface: str = "") -> KeptPort:
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
            sock.bind((interface, port))
            sock.listen(backlog or self.backlog)
        except OSError as e:
            sock.close()
            raise CannotListenError(interface, port, e) from None
        bound = sock.getsockname()[1]
        ident = self._next_id
        self._next_id += 1
        address = IPv6Address if family == socket.AF_INET6 else IPv4Address
        kept = KeptPort(self, ident, factory, family, address("TCP", interface, bound))
        self._ports[ident] = kept
        self._send(MSG.pack(b"K", ident), sock)
        return kept

    def _close(self, port: KeptPort) -> None:
        if self._ports.get(port.ident) is not port:
            port._closed()  # the keeper that held it is gone
            return
        handing = MSG.pack(b"K", port.ident)
        for item in self._out:
            if item[0] == handing:  # never reached the keeper: close it here
                self._out.remove(item)
                if item[1] is not None:
                    item[1].close()
                del self._ports[port.ident]
                port._closed()
                return
        self._send(MSG.pack(b"C", port.ident), None)

    # -- the socketpair

    def _send(self, msg: bytes, sock: socket.socket | None) -> None:
        """Queued, and sent with the rest of this reactor turn's (`_flush`)."""
        self._out.append((msg, sock))
        if self._retry is None and self._control is not None:
            self._retry = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._retry = None
        while self._out and self._control is not None:
            batch = list(itertools.islice(self._out, HANDOVER_BATCH))
            socks = [sock for _, sock in batch if sock is not None]
            try:
                self._control.sendmsg([b"".join(msg for msg, _ in batch)],
                                      with_fd(*(s.fileno() for s in socks)) if socks else [])
            except BlockingIOError:
                self._retry = self.reactor.callLater(0.01, self._flush)
                return
            except OSError as e:
                self._lost(f"port keeper unreachable ({e.strerror})")
                return
            for _ in batch:
                self._out.popleft()
            for sock in socks:
                sock.close()  # the keeper has its own copy now

    # IReadDescriptor, for the reactor
    def fileno(self) -> int:
        return self._control.fileno() if self._control is not None else -1

    def logPrefix(self) -> str:
        return "PortKeeper"

    def connectionLost(self, reason: Any) -> None:
        self._lost("port keeper connection lost")

    def doRead(self) -> None:
        control = self._control
        # At most a batch of messages per call, as Twisted's Port accepts a batch:
        # a flood of connections must not starve the rest of the reactor.
        for _ in range(MESSAGES_PER_READ):
            if control is None or control is not self._control:
                return
            try:
                msg, ancdata, flags, _addr = control.recvmsg(
                    ERR.size, FD_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                self._lost(f"port keeper unreachable ({e.strerror})")
                return
            if not msg:
                self._lost("port keeper closed its end")
                return
            fds = fds_of(ancdata)
            try:
                self._message(msg, fds, truncated=bool(flags & socket.MSG_CTRUNC))
            except Exception:
                # One connection's trouble (a protocol that raised): log it and go on;
                # only the socketpair failing is the keeper's loss.
                log.failure("port keeper: handling a message failed")
            finally:
                for fd in fds:
                    os.close(fd)  # adoptStreamConnection made its own copy

    def _message(self, msg: bytes, fds: list[int], truncated: bool) -> None:
        kind, ident = MSG.unpack_from(msg)
        port = self._ports.get(ident)
        where = port.getHost().port if port is not None else "?"
        if kind == b"A":
            if not fds:
                log.error("port keeper: a connection to port {port} arrived without its "
                          "descriptor (hub out of descriptors?); it is lost", port=where)
            elif port is not None and port._stopped is None:
                self._adopt(fds[0], port)
            # else: accepted while the port was being closed; closing the copy ends it
        elif kind == b"c" and port is not None:
            del self._ports[ident]
            port._closed()
        elif kind == b"E":
            (_k, _i, code) = ERR.unpack(msg)
            log.error("port keeper: cannot accept on port {port}: {why}", port=where,
                      why=os.strerror(code) if code else "unknown error")
        elif kind == b"F" and port is not None:
            (_k, _i, code) = ERR.unpack(msg)
            log.error("port keeper could not take port {port} ({why}): its forward is "
                      "lost; dropping that tunnel so the device retries", port=where,
                      why=os.strerror(code) if code else "unknown error")
            del self._ports[ident]
            port._closed()
            if self.on_port_lost is not None:
                self.on_port_lost(port.getHost().port)
        if truncated:
            log.error("port keeper: a message lost its descriptor (hub out of descriptors?)")

    def _adopt(self, fd: int, port: KeptPort) -> None:
        try:
            self.reactor.adoptStreamConnection(fd, port.family, port.factory)
        except OSError as e:  # EMFILE, or the peer already gone: this connection only
            log.error("cannot take a connection to port {port}: {why}",
                      port=port.getHost().port, why=e.strerror)
