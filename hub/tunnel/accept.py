"""The listening port of a node's forward, with a leaner accept than Twisted's.

A short connection through a per-device port (an HTTP request to a device's
web UI, a monitoring poll) is accepted, piped and closed in about a hundred
microseconds of the hub's CPU, and Twisted's `Port.doRead` spent a tenth of
that on each accept: two new `Logger` objects and a log buffer (for the
EMFILE recovery's messages), a generator, and the standard library's
`socket.accept`, which converts the family and type to enums for every
socket. `ForwardPort.doRead` accepts with the socket's own `_accept` and
builds the connection exactly as Twisted does; on any error but "no more
connections" it hands over to Twisted's `doRead`, which retries the accept and
handles the error its own way (EMFILE with its reserved descriptor, EPERM,
ECONNABORTED and the like, each logged as before).
"""

from __future__ import annotations

import socket
from errno import EAGAIN, EWOULDBLOCK
from typing import Any

from twisted.internet import tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.python import log


class ForwardPort(tcp.Port):
    """`tcp.Port` with the lean accept above (see the module's docstring)."""

    _prefix: str | None = None

    def logPrefix(self) -> str:
        # Twisted's (the factory's class name), worked out once: the reactor
        # asks for it at every accept.
        if self._prefix is None:
            self._prefix = tcp.Port.logPrefix(self)
        return self._prefix

    def doRead(self) -> None:
        try:
            accepted = 0
            listener: Any = self.socket
            factory: Any = self.factory
            family, kind = self.addressFamily, self.socketType
            for _ in range(self.numberAccepts):
                try:
                    fd, addr = listener._accept()
                except OSError as e:
                    if e.args[0] in (EWOULDBLOCK, EAGAIN):
                        break
                    # Twisted's own accept loop, error handling and logging.
                    tcp.Port.doRead(self)
                    return
                skt = socket.socket(family, kind, 0, fileno=fd)
                accepted += 1
                if len(addr) == 4:  # IPv6: with the scope ID, as Twisted names it
                    host = socket.getnameinfo(
                        addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = factory.buildProtocol(self._buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                transport = self.transport(skt, protocol, addr, self, s, self.reactor)
                protocol.makeConnection(transport)
            # Twisted's scaling of the accepts per wake-up.
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.deferr()


def listen_forward(reactor: Any, port: int, factory: Any, interface: str) -> Any:
    """Listen on `port` for a forward: a `ForwardPort` on a real reactor,
    `listenTCP` on anything else (the port keeper, test reactors)."""
    if isinstance(reactor, PosixReactorBase):
        listening = ForwardPort(port, factory, 50, interface, reactor)
        listening.startListening()
        return listening
    return reactor.listenTCP(port, factory, interface=interface)
