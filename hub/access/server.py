"""The SSH server plumbing: factory, transport, user-auth and connection service.

Thin Conch subclasses that fix what Conch's defaults get wrong for an
Internet-facing hub: the modern transport of `hub.ssh` (AEAD ciphers, EtM
MACs, strict kex, rekeying, a user-key `server-sig-algs`), a 120 s login
timeout instead of 10 hours (counted from the TCP connect), a bound
on auth attempts and on unauthenticated connections, password back-off per
source address, server keepalives, and channel opens that may be refused with
a clear reason or answered later (a Deferred).
"""

from __future__ import annotations

from typing import Any

from twisted.conch.interfaces import IConchUser as _IConchUser
from twisted.conch.ssh import _kex, common, factory, transport, userauth
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.auth import PasswordBackoff
from hub.access.limits import Limits
from hub.ssh.algorithms import DEFAULT_POLICY, TransportPolicy
from hub.ssh.connection import HubConnection
from hub.ssh.iogroup import IOGroup
from hub.ssh.keys import HubKeys
from hub.ssh.modern import ModernTransportMixin
from hub.timeouts import ClockTimeout
from hub.tunnel.splice import READ_SIZE

log = Logger()

def peer_host(t: Any) -> str:
    peer = t.transport.getPeer() if t.transport is not None else None
    return getattr(peer, "host", "?")


class HubServerTransport(ClockTimeout, ModernTransportMixin, transport.SSHServerTransport):
    """Server transport: modern algorithms, strict kex and rekeying (the mixin),
    the login deadline (`ClockTimeout`), and the hub's accounting of
    unauthenticated connections."""

    factory: HubSSHFactory
    authenticated = False

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
        super().connectionMade()

    def timeoutConnection(self) -> None:
        log.info("{peer}: not authenticated within {t} s, disconnecting", peer=self.peer,
                 t=self.factory.limits.login_timeout)
        self.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                            b"login timeout")

    def authenticated_now(self) -> None:
        self.authenticated = True
        self.setTimeout(None)
        self.factory.connection_authenticated(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        self.factory.connection_closed(self)
        super().connectionLost(reason)


class HubUserAuthServer(userauth.SSHUserAuthServer):
    """User-auth with our limits and per-source password back-off."""

    transport: Any

    def serviceStarted(self) -> None:
        hub_factory: HubSSHFactory = self.transport.factory
        self.clock = hub_factory.clock
        self.loginTimeout = hub_factory.limits.login_timeout
        self.attemptsBeforeDisconnect = hub_factory.limits.max_auth_tries - 1
        self.backoff = hub_factory.backoff
        userauth.SSHUserAuthServer.serviceStarted(self)

    def auth_password(self, packet: bytes) -> defer.Deferred[Any]:
        source = self.transport.peer
        user: bytes = self.user or b""
        wait = self.backoff.delay(source)
        d: defer.Deferred[Any] = (
            task.deferLater(self.clock, wait, lambda: None) if wait else defer.succeed(None))

        def record(f: Failure) -> Failure:
            self.backoff.failed(source)
            log.info("failed password for {user!r} from {peer}: {why}",
                     user=self.user, peer=source, why=f.getErrorMessage())
            return f

        # Skip Conch's fixed passwordDelay: the back-off above replaces it.
        return d.addCallback(lambda _: self.portal.login(
            _password_credentials(user, packet), None, _IConchUser)).addErrback(record)

    def _cbFinishedAuth(self, result: Any) -> None:
        userauth.SSHUserAuthServer._cbFinishedAuth(self, result)
        self.transport.authenticated_now()


def _password_credentials(user: bytes, packet: bytes) -> UsernamePassword:
    return UsernamePassword(user, common.getNS(packet[1:])[0])


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
        self.primes = None  # no group-exchange: every modern client has curve25519
        self.clock = clock
        self.limits = limits
        self.keepalive = keepalive
        self.keepalive_count = keepalive_count
        self.backoff = PasswordBackoff(clock, limits.password_backoff_base,
                                       limits.password_backoff_max)
        self.unauthenticated: set[HubServerTransport] = set()
        # Shared by this hub's transports only: another hub (or client) in
        # the same process has its own.
        self.io_group = IOGroup()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self.unauthenticated) >= self.limits.max_unauthenticated:
            log.warn("refusing connection from {peer}: {n} unauthenticated connections already",
                     peer=getattr(addr, "host", addr), n=len(self.unauthenticated))
            return None
        # Conch's SSHFactory.buildProtocol, without its per-connection log line
        # about the moduli file: the hub offers no group exchange at all.
        t: Any = protocol.Factory.buildProtocol(self, addr)
        t.ioGroup = self.io_group
        policy = self.transport_policy
        t.supportedPublicKeys = policy.host_keys(
            alg for key in self.privateKeys.values() for alg in key.supportedSignatureAlgorithms())
        t.supportedKeyExchanges = policy.kex(k for k in t.supportedKeyExchanges
                                             if not _kex.isDynamicPrimesGroup(k))
        t.supportedMACs = policy.macs(t.supportedMACs)
        self.unauthenticated.add(t)
        return t

    def connection_authenticated(self, t: HubServerTransport) -> None:
        self.unauthenticated.discard(t)

    def connection_closed(self, t: HubServerTransport) -> None:
        self.unauthenticated.discard(t)
