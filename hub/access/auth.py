"""Who may log in: credential checkers, avatar identities and password back-off.

The checkers only decide; they return small identity values (`DeviceLogin`)
that the realm in `service` turns into avatars. bcrypt runs off the reactor
thread through the injected `run_in_thread`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import bcrypt
from attrs import define, field
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from hub.errors import BadPassword, NotFound
from hub.rules.logins import DeviceLogin, OperatorLogin, parse_login
from hub.rules.throttle import OncePer
from hub.ssh.algorithms import USERAUTH_SIGNATURE_ALGORITHMS
from hub.store.offthread import RegistryCalls
from hub.store.registry import Node, Registry, User

CALLHOME_PASSWORD = "callhome_password"  # noqa: S105 (a settings key, not a secret)

# Signature algorithms we verify for user keys (and announce in server-sig-algs).
# ssh-rsa (SHA-1) and DSA are off: OpenSSH itself stopped accepting them in 8.8.
USER_SIG_ALGS: tuple[bytes, ...] = USERAUTH_SIGNATURE_ALGORITHMS

log = Logger()


# Checked instead of a real hash for an unknown operator (same cost as hash_password's).
DUMMY_HASH = "$2b$12$T2nifPv27R4PV.XWJS0l3OeUkytkhCJ95stWgsiywh.iIyx0cY3X6"

# bcrypt uses the first 72 bytes only; newer bcrypt refuses longer input.
MAX_PASSWORD = 72


def hash_password(password: bytes, rounds: int = 12) -> str:
    if len(password) > MAX_PASSWORD:
        raise BadPassword(f"the password is {len(password)} bytes long; "
                          f"at most {MAX_PASSWORD} bytes can be stored (bcrypt's limit)")
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds)).decode()


def check_password(password: bytes, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(password, hashed.encode())
    except ValueError:
        return False


def _text(peer_bytes: bytes) -> str:
    # The peer's bytes in a message: words, never a bytes repr.
    return peer_bytes.decode("ascii", "replace")


@define(eq=False)
class NoPasswordWarnings:
    """While devices are refused because no Call Home Password is set: a warning
    for the first, then at most one a minute (not one per attempt, which a fleet
    of devices retrying would turn into a flood), with the number refused since
    the last warning."""

    clock: IReactorTime
    interval: float = 60.0
    _once: OncePer = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._once = OncePer(interval=self.interval)

    def refused(self, source: str) -> None:
        held = self._once.due(self.clock.seconds())
        if held is None:
            return
        log.warn("device login refused from {peer}: no Call Home Password is set (set one "
                 "with: callhomehub callhome-password); {refused} refused since the last "
                 "warning", peer=source, refused=held + 1)


class InvalidUser(UnauthorizedLogin):
    """A login name that is neither the registrar user nor an operator (sshd's
    "Invalid user")."""


class NoCallHomePassword(UnauthorizedLogin):
    """The registrar user tried a password, but none is set on this hub: no
    device can register (counted apart: it is the operator's to fix)."""


def operator(registry: Registry, name: str) -> User | None:
    """Operator `name`'s row, or None (run in the registry thread)."""
    try:
        return registry.user(name)
    except NotFound:
        return None


@implementer(ICredentialsChecker)
class CallHomePasswordChecker:
    """The registrar user with the Call Home Password, operators with their own
    password (bcrypt, off the reactor)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, calls: RegistryCalls, registrar_user: str,
                 run_in_thread: Callable[..., defer.Deferred[Any]]) -> None:
        self._calls = calls  # the registry, read off the reactor
        self._user = registrar_user.encode()
        self._run = run_in_thread

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        name = credentials.username.decode("utf-8", "replace")
        if credentials.username != self._user:
            return self._operator(name, credentials.password)

        def check(hashed: str | None) -> defer.Deferred[DeviceLogin]:
            if hashed is None:
                raise NoCallHomePassword("no Call Home Password is set on this hub")
            return self._run(check_password, credentials.password, hashed).addCallback(decide)

        def decide(ok: bool) -> DeviceLogin:
            if not ok:
                raise UnauthorizedLogin("wrong Call Home Password")
            return DeviceLogin(None)

        return self._calls.call(Registry.setting, CALLHOME_PASSWORD).addCallback(check)

    def _operator(self, name: str, password: bytes) -> defer.Deferred[Any]:
        try:
            login = parse_login(name)
        except UnauthorizedLogin:
            return self._refuse_alike(password, InvalidUser(f"no operator {name!r}"))

        def check(user: User | None) -> defer.Deferred[Any]:
            if user is None:
                return self._refuse_alike(password, InvalidUser(f"no operator {name!r}"))
            return self._check_operator(login, user, password)

        return self._calls.call(operator, login.user).addCallback(check)

    def _check_operator(self, login: OperatorLogin, user: User,
                        password: bytes) -> defer.Deferred[Any]:
        if user.password_hash is None:
            return self._refuse_alike(
                password, UnauthorizedLogin(f"operator {user.name} has no password"))

        def decide(ok: bool) -> OperatorLogin:
            if not ok:
                raise UnauthorizedLogin(f"wrong password for operator {user.name}")
            return OperatorLogin(user.name, login.node, login.port, identity=user.identity,
                                 credential=user.password_hash)

        return self._run(check_password, password, user.password_hash).addCallback(decide)

    def _refuse_alike(self, password: bytes, why: UnauthorizedLogin) -> defer.Deferred[Any]:
        """Refuse after the same bcrypt work as a real check, so that the time
        taken does not tell which operator names exist or have a password."""

        def refuse(_: bool) -> Any:
            raise why

        return self._run(check_password, password, DUMMY_HASH).addCallback(refuse)


# Device keys a probe found, kept for the signed request that follows it.
PROBES_KEPT = 1024


@implementer(ICredentialsChecker)
class DeviceKeyChecker:
    """The registrar user with a registered, not revoked device key; operators
    with one of their keys.

    A client offers its key first (a probe, no signature; OpenSSH and libssh2
    do) and signs once the hub said the key would do: the node the probe read
    is kept (at most PROBES_KEPT keys, the oldest forgotten first) and the signed
    request takes it instead of reading the key's node again, unless the hub
    applied a registry change (`changes()`, LiveSessions.applied) since the
    probe's read was asked for. A revocation the hub has not applied yet is
    applied to the logged-in connection as to any other."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, calls: RegistryCalls, registrar_user: str,
                 changes: Callable[[], int] = lambda: 0) -> None:
        self._calls = calls  # the registry, read off the reactor
        self._user = registrar_user.encode()
        self._changes = changes
        self._probed: dict[bytes, tuple[int, Node]] = {}

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        if credentials.algName not in USER_SIG_ALGS:
            return defer.fail(UnauthorizedLogin(
                f"signature algorithm {_text(credentials.algName)} not allowed"))
        if credentials.username != self._user:
            name = credentials.username.decode("utf-8", "replace")
            try:
                login = parse_login(name)
            except UnauthorizedLogin:
                return defer.fail(InvalidUser(f"no operator {name!r}"))
            return self._calls.call(operator, login.user).addCallback(
                lambda user: self._operator(credentials, name, login, user))
        asked = self._changes()
        if credentials.signature is not None:
            kept = self._probed.pop(credentials.blob, None)
            if kept is not None and kept[0] == asked:
                return defer.maybeDeferred(self._device, credentials, kept[1], asked)
        return self._calls.call(Registry.node_by_key, credentials.blob).addCallback(
            lambda node: self._device(credentials, node, asked))

    def _operator(self, credentials: Any, name: str, login: OperatorLogin,
                  user: User | None) -> OperatorLogin:
        if user is None:
            raise InvalidUser(f"no operator {name!r}")
        if credentials.blob not in user.keys:
            raise UnauthorizedLogin(f"key not registered for operator {user.name}")
        verify_signature(credentials)
        return OperatorLogin(user.name, login.node, login.port, identity=user.identity,
                             credential=credentials.blob)

    def _device(self, credentials: Any, node: Node | None, asked: int | None = None
                ) -> DeviceLogin:
        if node is None:
            raise UnauthorizedLogin("key is not registered")
        if node.state == "revoked":
            log.warn("refused revoked key of node {node}", node=node.name)
            raise UnauthorizedLogin(f"node {node.name} is revoked")
        if credentials.signature is None and asked is not None:
            if len(self._probed) >= PROBES_KEPT:
                del self._probed[next(iter(self._probed))]
            self._probed[credentials.blob] = (asked, node)
        verify_signature(credentials)
        return DeviceLogin(node.name, record=node, read_at=asked)


def verify_signature(credentials: Any) -> None:
    """Raise ValidPublicKey for a key probe, UnauthorizedLogin for a bad signature."""
    if credentials.signature is None:
        raise ValidPublicKey()
    try:
        key = keys.Key.fromString(credentials.blob)
        ok = key.verify(credentials.signature, credentials.sigData)
    except (keys.BadKeyError, ValueError) as e:
        raise UnauthorizedLogin(f"bad key or signature: {e}") from None
    if not ok:
        raise UnauthorizedLogin("signature does not verify")


@define
class PasswordBackoff:
    """Exponential delay for password attempts from a source with recent failures.

    Only password attempts wait: key logins are never delayed, so many devices
    behind one CGNAT address are not punished for one of them (or an attacker)
    guessing passwords.
    """

    clock: IReactorTime
    base: float = 1.0
    cap: float = 30.0
    window: float = 600.0
    max_sources: int = 10000
    _failures: OrderedDict[str, tuple[int, float]] = field(factory=OrderedDict)

    def delay(self, source: str) -> float:
        entry = self._failures.get(source)
        if entry is None:
            return 0.0
        count, last = entry
        if self.clock.seconds() - last > self.window:
            del self._failures[source]
            return 0.0
        return float(min(self.cap, self.base * 2 ** (count - 1)))

    def failed(self, source: str) -> None:
        now = self.clock.seconds()
        count, last = self._failures.pop(source, (0, now))
        if now - last > self.window:
            count = 0
        self._failures[source] = (count + 1, now)
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)
