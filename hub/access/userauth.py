"""User authentication on the hub's SSH server: one request at a time per connection,
per-source password back-off and the hub's bcrypt budget, operator certificates (which
Conch cannot read), and one sshd-style log line per outcome (`hub.access.authlog`)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from twisted.conch import error as conch_error
from twisted.conch.interfaces import IConchUser as _IConchUser
from twisted.conch.ssh import common, transport, userauth
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access import authlog
from hub.access.auth import InvalidUser, NoCallHomePassword
from hub.access.certs import CertificateCredentials, is_certificate
from hub.ssh.loglevel import GatedLogger

if TYPE_CHECKING:
    from hub.access.server import HubSSHFactory

log = Logger()


class HubUserAuthServer(userauth.SSHUserAuthServer):
    """User-auth with our limits, one request at a time, per-source password
    back-off and the bcrypt budget."""

    transport: Any
    # Conch's per-request debug lines, dropped before they are built.
    _log = GatedLogger()
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
        # The last key offered and its text: a client probes, then signs with the
        # same key, and the text (a SHA-256 fingerprint) is worked out once.
        self._key_text: tuple[bytes, bytes, str] | None = None
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
        known = self._key_text
        if known is None or known[0] != algorithm or known[1] != blob:
            known = self._key_text = (algorithm, blob, authlog.key_text(algorithm, blob))
        self._key = (known[2], signature is not None)
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
            log.info("{line}", line=authlog.invalid_user(user, host, port))
        key = None
        if self.method == b"publickey":
            if self._key is None or not self._key[1]:
                return  # an unsigned probe: clients try each key they have
            key = self._key[0]
        elif self.method != b"password":
            return
        log.info("{line}", line=authlog.failed(self.method, user, host, port, key, invalid))
        audit = self.transport.factory.audit
        if audit is not None:
            audit(f"{authlog.who(user)}@{host}", "login-failed", authlog.who(user),
                  f"{self.method.decode()}{' ' + key if key else ''} port {port}")

    def _cbFinishedAuth(self, result: Any) -> None:
        host, port = self._where()
        key = self._key[0] if self.method == b"publickey" and self._key else None
        log.info("{line}", line=authlog.accepted(self.method, self.user or b"", host, port, key))
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
