"""The SSH server plumbing: factory, transport, user-auth and connection service.

Thin Conch subclasses that fix what Conch's defaults get wrong for an
Internet-facing hub: the modern transport of `hub.ssh` (AEAD ciphers, EtM
MACs, strict kex, rekeying, a user-key `server-sig-algs`), a 120 s login
timeout instead of 10 hours (counted from the TCP connect), a bound
on auth attempts and on unauthenticated connections, password back-off per
source address, server keepalives, and channel opens that may be refused with
a clear reason or answered later (a Deferred).

Before login, `hub.access.gatekeeper` decides which connections are accepted
(per-source caps, random early drop, penalties) and budgets bcrypt work; a
connection must finish key exchange within `kex_grace` seconds, and its
authentication requests are handled one at a time, as sshd does.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.conch.ssh import _kex, factory, transport
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.auth import NoPasswordWarnings, PasswordBackoff
from hub.access.gatekeeper import Gatekeeper, PasswordBudget
from hub.access.limits import Limits
from hub.access.proxyheader import ProxyHeaderReader
from hub.access.userauth import HubUserAuthServer
from hub.rules.admission import Networks, within
from hub.ssh.algorithms import DEFAULT_POLICY, HOST_KEY_ALGORITHMS, TransportPolicy
from hub.ssh.connection import HubConnection
from hub.ssh.disconnect import log_peer_disconnect
from hub.ssh.hostcerts import HOST_CERT_ALGORITHM, HostCertificateMixin
from hub.ssh.iogroup import IOGroup
from hub.ssh.keys import HubKeys
from hub.ssh.modern import ModernTransportMixin
from hub.timeouts import ClockTimeout
from hub.tunnel.splice import READ_SIZE

log = Logger()

def peer_host(t: Any) -> str:
    peer = t.transport.getPeer() if t.transport is not None else None
    return getattr(peer, "host", "?")


class HubServerTransport(ClockTimeout, ModernTransportMixin, HostCertificateMixin,
                         transport.SSHServerTransport):
    """Server transport: modern algorithms, strict kex and rekeying (the mixin),
    the login deadline (`ClockTimeout`), and the hub's accounting of
    unauthenticated connections."""

    factory: HubSSHFactory
    # A host certificate is offered only by a factory that has one (buildProtocol).
    hostKeyAlgorithms = (*HOST_KEY_ALGORITHMS, HOST_CERT_ALGORITHM)
    authenticated = False
    heard = False  # any byte from the peer yet
    _kex_grace: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # Read up to READ_SIZE per system call, as sshd does (about 150 KiB
        # per read in a bulk transfer): fewer reads, and the channel data of
        # several packets goes out to TCP in one write (SpliceChannel).
        tcp: Any = self.transport
        tcp.bufferSize = READ_SIZE
        self.peer = peer_host(self)
        self.clock = self.factory.clock
        # Conch's own login timeout starts only when the client asks for
        # ssh-userauth; a peer that stalls before that would be kept forever.
        self.setTimeout(self.factory.limits.login_timeout)
        # A peer has far less time to finish key exchange: a silent socket
        # must not hold a slot for the whole login window.
        self._kex_grace = self.clock.callLater(self.factory.limits.kex_grace, self._kex_too_slow)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.heard = True
        if self.authenticated:
            super().dataReceived(data)
            return
        # Before login nothing is relayed through this connection: what one read
        # is answered with goes out with one send (the key exchange's reply and
        # NEWKEYS; EXT_INFO and SERVICE_ACCEPT), not a send per packet.
        batched = self.beginBatch()
        try:
            super().dataReceived(data)
        finally:
            if batched:
                self.endBatch()

    def _newKeys(self) -> None:
        self._cancel_kex_grace()
        super()._newKeys()

    def _cancel_kex_grace(self) -> None:
        if self._kex_grace is not None and self._kex_grace.active():
            self._kex_grace.cancel()
        self._kex_grace = None

    def _kex_too_slow(self) -> None:
        self._kex_grace = None
        log.info("{peer}: no key exchange within {t} s, disconnecting", peer=self.peer,
                 t=self.factory.limits.kex_grace)
        self.disconnectNow(transport.DISCONNECT_KEY_EXCHANGE_FAILED, b"key exchange timeout")

    def silent(self) -> bool:
        """Nothing read from the peer and nothing waiting to be read: the hub
        may accept a burst of connections before it reads any of them, and a
        real client's version line is then in the socket's buffer."""
        if self.heard:
            return False
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            return True
        try:
            waiting = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return True  # nothing yet (EAGAIN), or the connection is broken
        self.heard = waiting != b""
        return not self.heard

    def drop_silent(self) -> None:
        """Make room for a newer connection from the same source (counted as
        gone at once: TCP reports the loss only on the next reactor turn)."""
        self.factory.connection_closed(self)
        lower: Any = self.transport
        if lower is not None:
            lower.abortConnection()

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        log_peer_disconnect(log, self.peer, reasonCode, description)

    def timeoutConnection(self) -> None:
        log.info("{peer}: not authenticated within {t} s, disconnecting", peer=self.peer,
                 t=self.factory.limits.login_timeout)
        self.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                            b"login timeout")

    def authenticated_now(self, key: bool) -> None:
        self.authenticated = True
        self.setTimeout(None)
        self.factory.connection_authenticated(self, key)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        self._cancel_kex_grace()
        self.factory.connection_closed(self)
        super().connectionLost(reason)


class HubSSHFactory(factory.SSHFactory):
    """Builds hub transports; counts and bounds unauthenticated connections."""

    protocol = HubServerTransport
    noisy = False
    services = {
        b"ssh-userauth": HubUserAuthServer,
        b"ssh-connection": HubConnection,
    }

    def __init__(self, portal: Any, hub_keys: HubKeys, clock: IReactorTime, limits: Limits,
                 keepalive: float, keepalive_count: int,
                 transport_policy: TransportPolicy = DEFAULT_POLICY) -> None:
        self.portal = portal
        self.transport_policy = transport_policy
        self.publicKeys = hub_keys.host_public
        self.privateKeys = hub_keys.host_private
        self.host_certificate = hub_keys.host_certificate
        self.primes = None  # no group-exchange: every modern client has curve25519
        self.clock = clock
        self.limits = limits
        self.keepalive = keepalive
        self.keepalive_count = keepalive_count
        self.backoff = PasswordBackoff(clock, limits.password_backoff_base,
                                       limits.password_backoff_max)
        self.unauthenticated: set[HubServerTransport] = set()
        self.connections: set[HubServerTransport] = set()  # every open one, for shutdown
        # Where denied logins are also recorded (the registry's audit), if anywhere.
        self.audit: Callable[[str, str, str, str], None] | None = None
        self.on_closed: Callable[[HubServerTransport], None] | None = None
        self.gate = Gatekeeper(limits, clock)
        self.no_password = NoPasswordWarnings(clock)
        self.password_budget = PasswordBudget(limits, clock,
                                              max_wait=min(10.0, limits.login_timeout),
                                              exempt=self.gate.admission.exempt)
        # Shared by this hub's transports only: another hub (or client) in
        # the same process has its own.
        self.io_group = IOGroup()
        # Plain counts the metrics read (hub.web.metrics): refused logins by
        # kind (failure_kind, and "refused_preauth" for connections refused
        # before login), channel opens refused by SSH reason code (HubConnection).
        self.auth_failures: Counter[str] = Counter()
        self.channel_refusals: Counter[int] = Counter()
        # Load balancers whose connections start with a PROXY protocol header
        # (hub.access.proxyheader), and their connections still reading it.
        self.proxy_from: Networks = ()
        self.awaiting_header: set[ProxyHeaderReader] = set()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        source = str(getattr(addr, "host", addr))
        if addr is None or not self.proxy_from or not within(source, self.proxy_from):
            return self.build_transport(addr)
        if self._full(f"{source} (a load balancer)"):
            return None
        reader = ProxyHeaderReader(addr, self.build_transport, self.clock,
                                   self.awaiting_header.discard)
        self.awaiting_header.add(reader)
        return reader

    def build_transport(self, addr: IAddress | None) -> Any:
        """The SSH transport of a connection from `addr` (a device's address also when
        a load balancer relays it), or None: refused before login."""
        source = str(getattr(addr, "host", addr))
        if self._full(source):
            return None
        if not self.gate.admit(source):
            self.auth_failures["refused_preauth"] += 1
            return None
        # Conch's SSHFactory.buildProtocol, without its per-connection log line
        # about the moduli file: the hub offers no group exchange at all.
        t: Any = protocol.Factory.buildProtocol(self, addr)
        t.ioGroup = self.io_group
        policy = self.transport_policy
        t.supportedPublicKeys = policy.host_keys(
            alg for key in self.privateKeys.values() for alg in key.supportedSignatureAlgorithms())
        certificate = self.host_certificate
        if certificate is not None and certificate.valid_at(self.clock.seconds()):
            # Last: a client that knows the plain key keeps using it (OpenSSH
            # prefers the algorithms of the keys it knows; its order decides).
            t.supportedPublicKeys.append(HOST_CERT_ALGORITHM)
        t.supportedKeyExchanges = policy.kex(k for k in t.supportedKeyExchanges
                                             if not _kex.isDynamicPrimesGroup(k))
        t.supportedMACs = policy.macs(t.supportedMACs)
        t.peer = source
        self.unauthenticated.add(t)
        self.connections.add(t)
        self.gate.opened(t)
        return t

    def _full(self, peer: str) -> bool:
        """Whether `max_unauthenticated` connections wait already (those still reading
        a PROXY protocol header count): the new one from `peer` is refused."""
        waiting = len(self.unauthenticated) + len(self.awaiting_header)
        if waiting < self.limits.max_unauthenticated:
            return False
        log.warn("refusing connection from {peer}: {n} unauthenticated connections already",
                 peer=peer, n=waiting)
        self.auth_failures["refused_preauth"] += 1
        return True

    def connection_authenticated(self, t: HubServerTransport, key: bool) -> None:
        self.unauthenticated.discard(t)
        self.gate.done(t, login=True, key=key)

    def connection_closed(self, t: HubServerTransport) -> None:
        self.unauthenticated.discard(t)
        self.connections.discard(t)
        if self.on_closed is not None:
            self.on_closed(t)
        self.gate.done(t, login=False)

    def disconnect_all(self, why: str, grace: float) -> defer.Deferred[None]:
        """Say `why` to every client (SSH_MSG_DISCONNECT, by application) and fire
        once they are all gone, or after `grace` seconds, whichever comes first."""
        open_now = [t for t in self.connections if not t.isDisconnecting()]
        if not open_now:
            return defer.succeed(None)
        log.info("disconnecting {n} SSH connections: {why}", n=len(open_now), why=why)
        done: defer.Deferred[None] = defer.Deferred()
        waiting: set[HubServerTransport | None] = set(open_now)

        def check(closed: HubServerTransport | None = None) -> None:
            # One close at a time is taken off what is left: comparing all of them
            # at each close was quadratic, seconds of CPU at stop with thousands.
            waiting.discard(closed)
            if not done.called and not waiting:
                done.callback(None)

        self.on_closed = check
        for t in open_now:
            t.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, why.encode())
        timer = self.clock.callLater(grace, lambda: None if done.called else done.callback(None))
        done.addCallback(lambda _: timer.cancel() if timer.active() else None)
        check()
        return done
