"""Who is signed in on a request: the session cookie, checked against the registry.

The operator's row is read on every request: a deleted operator, a changed
password or key (`hub.access.operators.lapsed`) ends the session at once, and
the admin mark and grants in force are those of now.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.logger import Logger

from hub.access.operators import lapsed
from hub.access.reach import OperatorReach
from hub.errors import NotFound
from hub.store.rows import User
from hub.web.html import Viewer
from hub.web.needs import WebNeeds
from hub.web.sessions import COOKIE, WebSession

log = Logger()


def source(request: Any) -> str:
    """The peer's address (the proxy's, behind a reverse proxy)."""
    return str(getattr(request.getClientAddress(), "host", "?"))


@frozen
class SignedIn:
    session: WebSession
    user: User
    reach: OperatorReach

    @property
    def viewer(self) -> Viewer:
        return Viewer(self.user.name, self.user.admin, self.session.csrf)

    @property
    def actor(self) -> str:
        return self.reach.actor


def signed_in(needs: WebNeeds, request: Any) -> SignedIn | None:
    cookie = request.getCookie(COOKIE)
    if not cookie:
        return None
    session = needs.sessions.get(cookie.decode("ascii", "replace"))
    if session is None:
        return None
    try:
        user: User | None = needs.registry.user(session.login.user)
    except NotFound:
        user = None
    why = lapsed(session.login, user)
    if why is not None or user is None:
        log.info("{why}: ending its web session", why=why)
        needs.sessions.end(session)
        return None
    address = source(request)
    reach = OperatorReach(needs.gateway, session.login, lambda: address)
    # The grants as the SSH side reads them: a pair's grant covers its members.
    return SignedIn(session, reach.user() or user, reach)


def set_session_cookie(request: Any, session: WebSession | None) -> None:
    """Set (or, with None, clear) the one console cookie."""
    request.addCookie(COOKIE, session.id.encode() if session else b"", path=b"/",
                      secure=True, httpOnly=True, sameSite="strict",
                      max_age=None if session else b"0")
