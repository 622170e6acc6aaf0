"""Signed-in browsers: web sessions kept in the registry, with idle and absolute expiry.

A session id is 256 random bits, made new at every sign-in (an id a browser
brought before signing in is never kept: no fixation). The registry keeps only
hashes (`hub.store.websessions`), so every hub and worker on it knows the
session and a restart signs no one out. A session holds the `OperatorLogin` it
stands on, re-checked against the registry on every request
(`hub.access.operators.lapsed`). Its proxy cookie and its CSRF token are derived
from the id (HMAC-SHA256), so neither is stored: the proxy cookie finds its
session by its own hash, and the CSRF token follows from the proxy cookie.

"Last used" is written at most once a minute per session (`USED_EVERY`), not on
every request: the idle timeout ends a session between `idle - USED_EVERY` and
`idle` seconds after its last request, never later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable

from attrs import define, frozen
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.rules.logins import OperatorLogin
from hub.store.offthread import RegistryCalls
from hub.store.registry import Registry
from hub.store.websessions import WebSessionRow, token_hash

log = Logger()

COOKIE = b"__Host-chh-session"
# The device web UI proxy's cookie (docs/web-proxy.md): a device's pages run in an
# opaque origin (CSP sandbox), so the browser does not send the SameSite=Strict console
# cookie with their links and forms; this one, good for /nodes/NAME/web/ only, stands in.
BROWSE_COOKIE = b"__Secure-chh-browse"
USED_EVERY = 60.0      # seconds between two writes of a session's "last used"
PRUNE_EVERY = 300.0    # seconds between two prunes of expired rows
PRUNE_LIMIT = 1000     # rows of each table one prune deletes at most


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def derived(secret: str, purpose: str) -> str:
    """A token for `purpose` that follows from `secret` and does not give it away."""
    digest = hmac.new(secret.encode("ascii", "replace"), purpose.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


@frozen
class WebSession:
    key: str         # the row's key: the SHA-256 of the id
    browse: str      # the proxy cookie's value
    login: OperatorLogin
    address: str
    created: float
    used: float
    id: str | None = None  # the cookie's value; None when found by the proxy cookie

    @property
    def csrf(self) -> str:
        return derived(self.browse, "csrf")


@define(eq=False)
class SessionStore:
    """Sessions kept in the registry, read and written in the hub's registry thread
    (`calls`): reads answer with Deferreds, writes are queued in order (a session
    ended here is gone for every later read)."""

    calls: RegistryCalls
    clock: IReactorTime
    idle: float = 1800.0
    absolute: float = 43200.0
    max_sessions: int = 10000
    used_every: float = USED_EVERY

    def start(self, login: OperatorLogin, address: str) -> defer.Deferred[WebSession]:
        """A new session, once its row is written."""
        now = self.clock.seconds()
        session_id = new_secret()
        browse = derived(session_id, "browse")
        session = WebSession(token_hash(session_id), browse, login, address, now, now,
                             session_id)
        return self.calls.call(Registry.web_session_add, session_id, browse, login, address,
                               now, now + self.absolute, self.max_sessions).addCallback(
            lambda _: session)

    def get(self, session_id: str) -> defer.Deferred[WebSession | None]:
        """The live session with this id (its idle clock restarted), else None."""
        if not session_id:
            return defer.succeed(None)
        return self.calls.call(Registry.web_session, session_id).addCallback(
            self.live, derived(session_id, "browse"), session_id)

    def by_browse(self, token: str) -> defer.Deferred[WebSession | None]:
        """The live session whose proxy cookie is `token` (its idle clock restarted)."""
        if not token:
            return defer.succeed(None)
        return self.calls.call(Registry.web_session_by_browse, token).addCallback(
            self.live, token, None)

    def end(self, session: WebSession) -> None:
        self.calls.write(Registry.web_session_end, session.key)

    def prune(self) -> defer.Deferred[int]:
        """Delete expired sessions and links (a bounded number per call)."""
        def pruned(gone: int) -> int:
            if gone:
                log.info("web: {n} expired sessions and sign-in links pruned", n=gone)
            return gone

        return self.calls.call(Registry.web_prune, self.clock.seconds(), self.idle,
                               PRUNE_LIMIT).addCallback(pruned)

    def fresh(self, row: WebSessionRow, now: float) -> bool:
        """Whether a session row is live at `now` (not past either expiry)."""
        return now < row.expires and now - row.used <= self.idle

    def live(self, row: WebSessionRow | None, browse: str,
             session_id: str | None) -> WebSession | None:
        """The session a row read now stands for while it is live (its "last used"
        written at most once per `used_every`), else None (an expired row is deleted)."""
        if row is None:
            return None
        now = self.clock.seconds()
        if not self.fresh(row, now):
            self.calls.write(Registry.web_session_end, row.id_hash)
            return None
        used = row.used
        if now - used >= self.used_every:
            self.calls.write(Registry.web_session_used, row.id_hash, now,
                             now - self.used_every)
            used = now
        return WebSession(row.id_hash, browse, row.login, row.address, row.created, used,
                          session_id)


def pruning(store: SessionStore) -> Callable[[], defer.Deferred[None]]:
    """The prune as a timer's call: a failure is logged, the next call tries again."""
    def failed(f: Failure) -> None:
        # The registry busy or gone: the timer must go on.
        log.warn("web: pruning expired sessions failed, will try again: {error}",
                 error=f.getErrorMessage() or repr(f.value))

    def prune() -> defer.Deferred[None]:
        return store.prune().addCallbacks(lambda _: None, failed)
    return prune
