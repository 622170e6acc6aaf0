"""The PROXY protocol header a load balancer sends before a device's SSH connection.

Behind HAProxy (or an AWS NLB, or nginx's stream proxy) every device connection comes
from the balancer's address. With `send-proxy` / `send-proxy-v2` the balancer writes one
header first that names the device's own address and port (PROXY protocol v1, a text
line, or v2, binary: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt). The
hub reads that header only from the addresses it is told to trust (`[ssh]
proxy_protocol_from`); anyone else is a direct client whose first bytes are SSH.

The header is read before the SSH protocol exists, so everything the hub decides about
a connection (the per-source caps, the penalties, the log lines, fail2ban's view, the
peer shown for a node) uses the device's address. The SSH transport then takes over the
TCP connection as it is: nothing sits between them for the connection's life.

The parsers are Twisted's (`twisted.protocols.haproxy`, whose public wrapper would
start SSH before the header is read and stay in every read and write); their private
names are listed in hub/ssh/privates.py with the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

log = Logger()

# A balancer writes its header at once, with the connection; one that does not in
# this time is not speaking the protocol (or the hub is told to trust a non-balancer).
HEADER_TIMEOUT = 10.0
_V2_SIGNATURE = V2Parser.PREFIX
_V1_SIGNATURE = V1Parser.PROXYSTR + b" "


def _host(address: IAddress | None) -> str:
    return str(getattr(address, "host", address))


class ProxyHeaderReader(protocol.Protocol):
    """Reads the header on a connection from a trusted balancer, then hands the TCP
    connection to the protocol `build(device address)` makes (None: refused)."""

    def __init__(self, balancer: IAddress, build: Callable[[IAddress], Any],
                 clock: IReactorTime, on_done: Callable[[ProxyHeaderReader], None],
                 timeout: float = HEADER_TIMEOUT) -> None:
        self.balancer = balancer
        self.build = build
        self.clock = clock
        self.on_done = on_done
        self.timeout = timeout
        self._parser: V1Parser | V2Parser | None = None
        self._head = b""
        self._deadline: IDelayedCall | None = None
        self.done = False

    def connectionMade(self) -> None:
        self._deadline = self.clock.callLater(self.timeout, self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return  # refused: the connection is closing
        if self._parser is None:
            self._head += data
            kind = self._kind(self._head)
            if kind is None:
                return  # too few bytes to tell yet
            self._parser = kind()
            data, self._head = self._head, b""
        try:
            info, rest = self._parser.feed(data)
        except InvalidProxyHeader:
            self._refuse("its PROXY protocol header is malformed")
            return
        if info is None:
            return
        # A LOCAL (v2) or UNKNOWN (v1) header is the balancer's own connection (a
        # health check): it stands for itself.
        source = info.source if info.source is not None else self.balancer
        self._finish()
        self.hand_over(source, rest or b"")

    def _kind(self, head: bytes) -> type[V1Parser] | type[V2Parser] | None:
        for signature, parser in ((_V2_SIGNATURE, V2Parser), (_V1_SIGNATURE, V1Parser)):
            if head.startswith(signature):
                return parser
        if any(signature.startswith(head) for signature in (_V2_SIGNATURE, _V1_SIGNATURE)):
            return None
        self._refuse(f"it sent no PROXY protocol header (it began {head[:32]!r})")
        return None

    def hand_over(self, source: IAddress, rest: bytes) -> None:
        """The device's connection: its SSH protocol on this TCP connection, whose
        peer is now the device's address for everything that asks."""
        tcp: Any = self.transport
        if source is not self.balancer:
            tcp.getPeer = lambda: source
        ssh = self.build(source)
        if ssh is None:
            tcp.loseConnection()
            return
        tcp.protocol = ssh
        ssh.makeConnection(tcp)
        if rest:
            ssh.dataReceived(rest)

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(f"no PROXY protocol header within {self.timeout:g} s")

    def _refuse(self, why: str) -> None:
        log.warn("connection from {balancer} (trusted for the PROXY protocol) closed: {why}",
                 balancer=_host(self.balancer), why=why)
        self._finish()
        if self.transport is not None:
            self.transport.loseConnection()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.on_done(self)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self._finish()
