"""Signed-in browsers: an in-memory store of web sessions with idle and absolute expiry.

A session id is 256 random bits, made new at every sign-in (an id a browser
brought before signing in is never kept: no fixation). A session holds the
`OperatorLogin` it stands on, re-checked against the registry on every request
(`hub.access.operators.lapsed`), and its CSRF token. Hub restarts sign everyone out.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

from hub.rules.logins import OperatorLogin

COOKIE = b"__Host-chh-session"
# The device web UI proxy's cookie (docs/web-proxy.md): a device's pages run in an
# opaque origin (CSP sandbox), so the browser does not send the SameSite=Strict console
# cookie with their links and forms; this one, good for /nodes/NAME/web/ only, stands in.
BROWSE_COOKIE = b"__Secure-chh-browse"


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


@define(eq=False)
class WebSession:
    id: str
    login: OperatorLogin
    address: str
    created: float
    used: float
    csrf: str = field(factory=new_secret)
    browse: str = field(factory=new_secret)  # the proxy cookie's value


@define(eq=False)
class SessionStore:
    clock: IReactorTime
    idle: float = 1800.0
    absolute: float = 43200.0
    max_sessions: int = 10000
    _sessions: dict[str, WebSession] = field(factory=dict)

    def start(self, login: OperatorLogin, address: str) -> WebSession:
        self._sweep()
        now = self.clock.seconds()
        session = WebSession(new_secret(), login, address, now, now)
        self._sessions[session.id] = session
        while len(self._sessions) > self.max_sessions:  # the oldest go first
            self._sessions.pop(next(iter(self._sessions)))
        return session

    def get(self, session_id: str) -> WebSession | None:
        """The live session with this id (its idle clock restarted), else None."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock.seconds()
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        session.used = now
        return session

    def by_browse(self, token: str) -> WebSession | None:
        """The live session whose proxy cookie is `token` (its idle clock restarted)."""
        found = next((s for s in self._sessions.values() if s.browse == token), None)
        return None if found is None else self.get(found.id)

    def end(self, session: WebSession) -> None:
        self._sessions.pop(session.id, None)

    def _expired(self, session: WebSession, now: float) -> bool:
        return now - session.used > self.idle or now - session.created > self.absolute

    def _sweep(self) -> None:
        now = self.clock.seconds()
        for session in [s for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[session.id]

    def __iter__(self) -> Iterator[WebSession]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)
