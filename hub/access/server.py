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
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.conch import error as conch_error
from twisted.conch.interfaces import IConchUser as _IConchUser
from twisted.conch.ssh import _kex, common, factory, transport, userauth
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access import authlog
from hub.access.auth import InvalidUser, NoCallHomePassword, NoPasswordWarnings, PasswordBackoff
from hub.access.certs import CertificateCredentials, is_certificate
from hub.access.gatekeeper import Gatekeeper, PasswordBudget
from hub.access.limits import Limits
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
        super().dataReceived(data)

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


class HubUserAuthServer(userauth.SSHUserAuthServer):
    """User-auth with our limits, one request at a time, per-source password
    back-off and the bcrypt budget."""

    transport: Any
    _busy = False
    _waiting: defer.Deferred[Any] | None = None

    def serviceStarted(self) -> None:
        hub_factory: HubSSHFactory = self.transport.factory
        self.clock = hub_factory.clock
        self.loginTimeout = hub_factory.limits.login_timeout
        self.attemptsBeforeDisconnect = hub_factory.limits.max_auth_tries - 1
        self.backoff = hub_factory.backoff
        self.budget = hub_factory.password_budget
        # Requests that came while one was being checked (a client that does
        # not wait for the answer): at most one connection's worth of tries.
        self._queue: list[bytes] = []
        self._key: tuple[str, bool] | None = None
        self._invalid_named: set[bytes] = set()
        userauth.SSHUserAuthServer.serviceStarted(self)

    def serviceStopped(self) -> None:
        self._queue.clear()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()  # no bcrypt for a connection that is gone
        userauth.SSHUserAuthServer.serviceStopped(self)

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:
        if self._busy:
            if len(self._queue) >= self.attemptsBeforeDisconnect + 1:
                log.info("{peer}: too many authentication requests at once, disconnecting",
                         peer=self.transport.peer)
                self._queue.clear()
                self.transport.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR,
                                              b"too many authentication requests at once")
                return None
            self._queue.append(packet)
            return None
        self._busy = True
        d = userauth.SSHUserAuthServer.ssh_USERAUTH_REQUEST(self, packet)
        if d is None:
            self._next(None)
            return None
        return d.addBoth(self._next)

    def _next(self, result: Any) -> Any:
        self._busy = False
        t = self.transport
        if self._queue and not t.isDisconnecting() and not t.authenticated:
            self.ssh_USERAUTH_REQUEST(self._queue.pop(0))
        return result

    def auth_password(self, packet: bytes) -> defer.Deferred[Any]:
        source = self.transport.peer
        user: bytes = self.user or b""

        def record(f: Failure) -> Failure:
            if f.check(defer.CancelledError):
                return Failure(conch_error.IgnoreAuthentication())
            self.backoff.failed(source)
            log.info("password refused for {user}: {why}", user=authlog.who(user),
                     why=f.getErrorMessage())
            if f.check(NoCallHomePassword):
                self.transport.factory.no_password.refused(source)
            return f

        budget = self.budget.reserve(source)
        if budget is None:
            return defer.fail(UnauthorizedLogin(
                "too many password checks from this address or on this hub; try later"
            )).addErrback(record)
        wait = max(budget, self.backoff.delay(source))

        def check(_: None) -> defer.Deferred[Any]:
            self._waiting = None
            return self.portal.login(_password_credentials(user, packet), None, _IConchUser)

        def cancelled(f: Failure) -> Failure:
            f.trap(defer.CancelledError)
            self.budget.refund(source)
            return f

        # Skip Conch's fixed passwordDelay: the back-off above replaces it.
        if wait:
            d = self._waiting = task.deferLater(self.clock, wait, lambda: None)
            d.addErrback(cancelled)
        else:
            d = defer.succeed(None)
        return d.addCallback(check).addErrback(record)

    def auth_publickey(self, packet: bytes) -> defer.Deferred[Any]:
        # What sshd names in its log line: the key's type and fingerprint, and
        # whether this was a real attempt (signed) or a probe (not worth a line).
        try:
            algorithm, rest = common.getNS(packet[1:])
            blob, rest = common.getNS(rest)
            signature = common.getNS(rest)[0] if packet[:1] != b"\x00" else None
        except (ValueError, struct.error):
            self._key = None
            return userauth.SSHUserAuthServer.auth_publickey(self, packet)  # type: ignore[no-any-return]
        self._key = (authlog.key_text(algorithm, blob), signature is not None)
        if is_certificate(algorithm):  # Conch cannot read certificates
            return self._auth_certificate(algorithm, blob, signature, packet)
        return userauth.SSHUserAuthServer.auth_publickey(self, packet)  # type: ignore[no-any-return]

    def _auth_certificate(self, algorithm: bytes, blob: bytes, signature: bytes | None,
                          packet: bytes) -> defer.Deferred[Any]:
        signed, user, service = None, self.user or b"", self.nextService or b""
        if signature is not None:  # what the client signed, as for a plain key
            signed = (common.NS(self.transport.sessionID) + bytes((userauth.MSG_USERAUTH_REQUEST,))
                      + common.NS(user) + common.NS(service)
                      + common.NS(b"publickey") + b"\x01" + common.NS(algorithm)
                      + common.NS(blob))
        credentials = CertificateCredentials(user, algorithm, blob, signed,
                                             signature, self.transport.peer)
        d = self.portal.login(credentials, None, _IConchUser)

        def refused(f: Failure) -> Failure:
            if f.check(UnauthorizedLogin) and not f.check(InvalidUser):
                # sshd says why too ("Certificate invalid: expired").
                log.info("certificate refused for {user}: {why}", user=authlog.who(user),
                         why=f.getErrorMessage())
            return f
        d.addErrback(refused)
        if signature is None:  # a probe: PK_OK if the certificate would be accepted
            d.addErrback(self._ebCheckKey, packet[1:])
        return d  # type: ignore[no-any-return]

    def _where(self) -> tuple[str, int]:
        peer = self.transport.transport.getPeer() if self.transport.transport else None
        return self.transport.peer, int(getattr(peer, "port", 0))

    def _ebBadAuth(self, reason: Failure) -> None:
        if not reason.check(conch_error.IgnoreAuthentication) and self.method != b"none":
            self._log_failure(reason)
        userauth.SSHUserAuthServer._ebBadAuth(self, reason)

    def _log_failure(self, reason: Failure) -> None:
        host, port = self._where()
        user = self.user or b""
        invalid = bool(reason.check(InvalidUser))
        kind = failure_kind(self.method, reason)
        if kind is not None:
            self.transport.factory.auth_failures[kind] += 1
        if invalid and user not in self._invalid_named:
            self._invalid_named.add(user)
            log.info(authlog.invalid_user(user, host, port))
        key = None
        if self.method == b"publickey":
            if self._key is None or not self._key[1]:
                return  # an unsigned probe: clients try each key they have
            key = self._key[0]
        elif self.method != b"password":
            return
        log.info(authlog.failed(self.method, user, host, port, key, invalid))
        audit = self.transport.factory.audit
        if audit is not None:
            audit(f"{authlog.who(user)}@{host}", "login-failed", authlog.who(user),
                  f"{self.method.decode()}{' ' + key if key else ''} port {port}")

    def _cbFinishedAuth(self, result: Any) -> None:
        host, port = self._where()
        key = self._key[0] if self.method == b"publickey" and self._key else None
        log.info(authlog.accepted(self.method, self.user or b"", host, port, key))
        userauth.SSHUserAuthServer._cbFinishedAuth(self, result)
        self.transport.authenticated_now(key=self.method == b"publickey")


def failure_kind(method: bytes, reason: Failure) -> str | None:
    """What the metrics count a refused login attempt as (the kinds of the
    sshd-style log lines, hub.access.authlog). A key refused when the client
    only offers it counts too (unlike the log): an unknown key is refused
    there, before any signature."""
    if reason.check(InvalidUser):
        return "invalid_user"
    if method == b"password":
        return "no_callhome_password" if reason.check(NoCallHomePassword) else "password"
    if method == b"publickey":
        return "publickey"
    return None


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
        self.on_closed: Callable[[], None] | None = None
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

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self.unauthenticated) >= self.limits.max_unauthenticated:
            log.warn("refusing connection from {peer}: {n} unauthenticated connections already",
                     peer=getattr(addr, "host", addr), n=len(self.unauthenticated))
            self.auth_failures["refused_preauth"] += 1
            return None
        source = str(getattr(addr, "host", addr))
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

    def connection_authenticated(self, t: HubServerTransport, key: bool) -> None:
        self.unauthenticated.discard(t)
        self.gate.done(t, login=True, key=key)

    def connection_closed(self, t: HubServerTransport) -> None:
        self.unauthenticated.discard(t)
        self.connections.discard(t)
        if self.on_closed is not None:
            self.on_closed()
        self.gate.done(t, login=False)

    def disconnect_all(self, why: str, grace: float) -> defer.Deferred[None]:
        """Say `why` to every client (SSH_MSG_DISCONNECT, by application) and fire
        once they are all gone, or after `grace` seconds, whichever comes first."""
        open_now = [t for t in self.connections if not t.isDisconnecting()]
        if not open_now:
            return defer.succeed(None)
        log.info("disconnecting {n} SSH connections: {why}", n=len(open_now), why=why)
        done: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            if not done.called and not self.connections.intersection(open_now):
                done.callback(None)

        self.on_closed = check
        for t in open_now:
            t.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, why.encode())
        timer = self.clock.callLater(grace, lambda: None if done.called else done.callback(None))
        done.addCallback(lambda _: timer.cancel() if timer.active() else None)
        check()
        return done
