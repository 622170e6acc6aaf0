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
from typing import Protocol

from attrs import define, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hub.rules.logins import OperatorLogin
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


class SessionRecords(Protocol):
    """The registry's web session rows (`hub.store.websessions.WebSessionRecords`)."""

    def web_session_add(self, session_id: str, browse: str, login: OperatorLogin,
                        address: str, now: float, expires: float, keep: int) -> None: ...

    def web_session(self, session_id: str) -> WebSessionRow | None: ...

    def web_session_by_browse(self, browse: str) -> WebSessionRow | None: ...

    def web_session_used(self, id_hash: str, now: float, unless_since: float) -> None: ...

    def web_session_end(self, id_hash: str) -> None: ...

    def web_prune(self, now: float, idle: float, limit: int) -> int: ...


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
    records: SessionRecords
    clock: IReactorTime
    idle: float = 1800.0
    absolute: float = 43200.0
    max_sessions: int = 10000
    used_every: float = USED_EVERY

    def start(self, login: OperatorLogin, address: str) -> WebSession:
        now = self.clock.seconds()
        session_id = new_secret()
        browse = derived(session_id, "browse")
        self.records.web_session_add(session_id, browse, login, address, now,
                                     now + self.absolute, self.max_sessions)
        return WebSession(token_hash(session_id), browse, login, address, now, now, session_id)

    def get(self, session_id: str) -> WebSession | None:
        """The live session with this id (its idle clock restarted), else None."""
        if not session_id:
            return None
        row = self.records.web_session(session_id)
        return self._live(row, derived(session_id, "browse"), session_id)

    def by_browse(self, token: str) -> WebSession | None:
        """The live session whose proxy cookie is `token` (its idle clock restarted)."""
        if not token:
            return None
        return self._live(self.records.web_session_by_browse(token), token, None)

    def end(self, session: WebSession) -> None:
        self.records.web_session_end(session.key)

    def prune(self) -> int:
        """Delete expired sessions and links (a bounded number per call)."""
        gone = self.records.web_prune(self.clock.seconds(), self.idle, PRUNE_LIMIT)
        if gone:
            log.info("web: {n} expired sessions and sign-in links pruned", n=gone)
        return gone

    def _live(self, row: WebSessionRow | None, browse: str,
              session_id: str | None) -> WebSession | None:
        if row is None:
            return None
        now = self.clock.seconds()
        if now >= row.expires or now - row.used > self.idle:
            self.records.web_session_end(row.id_hash)
            return None
        used = row.used
        if now - used >= self.used_every:
            self.records.web_session_used(row.id_hash, now, now - self.used_every)
            used = now
        return WebSession(row.id_hash, browse, row.login, row.address, row.created, used,
                          session_id)


def pruning(store: SessionStore) -> Callable[[], object]:
    """The prune as a timer's call: a failure is logged, the next call tries again."""
    def prune() -> None:
        try:
            store.prune()
        except Exception as e:  # the registry busy or gone: the timer must go on
            log.warn("web: pruning expired sessions failed, will try again: {error}",
                     error=str(e) or type(e).__name__)
    return prune
