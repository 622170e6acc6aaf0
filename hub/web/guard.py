"""Who is signed in on a request: the session cookie, checked against the registry.

The operator's row is read on every request: a deleted operator, a changed
password or key (`hub.access.operators.lapsed`) ends the session at once, and
the admin mark and grants in force are those of now.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.logger import Logger
from twisted.web.resource import Resource

from hub.access.operators import lapsed
from hub.access.reach import OperatorReach
from hub.errors import NotFound
from hub.store.rows import User
from hub.web.html import Viewer
from hub.web.needs import WebNeeds
from hub.web.sessions import BROWSE_COOKIE, COOKIE, WebSession

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


def signed_in(needs: WebNeeds, request: Any, browse: bool = False) -> SignedIn | None:
    """The operator signed in on `request`; with `browse` (a device web UI path), the
    proxy cookie stands in for the console cookie."""
    cookie = request.getCookie(COOKIE)
    session = needs.sessions.get(cookie.decode("ascii", "replace")) if cookie else None
    if session is None and browse:
        token = request.getCookie(BROWSE_COOKIE)
        session = needs.sessions.by_browse(token.decode("ascii", "replace")) if token else None
        if session is not None and not _from_a_device_page(request):
            log.info("web: device web UI request from another site ({origin}) refused",
                     origin=request.getHeader(b"origin"))
            return None
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
    reach = OperatorReach(needs.gateway, session.login, lambda: address, needs.registry)
    # The grants as the SSH side reads them: a pair's grant covers its members.
    return SignedIn(session, reach.user() or user, reach)


def set_session_cookie(request: Any, session: WebSession | None) -> None:
    """Set (or, with None, clear) the one console cookie."""
    value = session.id if session is not None else None  # None: found by the proxy cookie
    request.addCookie(COOKIE, value.encode() if value else b"", path=b"/",
                      secure=True, httpOnly=True, sameSite="strict",
                      max_age=None if value else b"0")


def _from_a_device_page(request: Any) -> bool:
    """A change made with the proxy cookie alone must come from a device page (its
    origin is opaque: `Origin: null`) or the console itself, not from another site."""
    if request.method in (b"GET", b"HEAD"):
        return True
    origin = request.getHeader(b"origin")
    return origin in (None, b"null") or urlsplit(origin).netloc == request.getHeader(b"host")


def set_browse_cookie(request: Any, session: WebSession) -> None:
    """The device web UI proxy's cookie: sent with the device pages' own links and forms
    (SameSite=None: they run in an opaque origin), to /nodes/ paths only, and honoured
    only under /nodes/NAME/web/ (the proxy strips it before the device sees a request)."""
    if request.getCookie(BROWSE_COOKIE) != session.browse.encode():
        request.addCookie(BROWSE_COOKIE, session.browse.encode(), path=b"/nodes/",
                          secure=True, httpOnly=True, sameSite="none")


class SignedInPage(Resource):
    """A page for signed-in operators (`show`); anyone else is sent to sign in."""

    isLeaf = True

    def __init__(self, needs: WebNeeds) -> None:
        super().__init__()
        self.needs = needs

    def render_GET(self, request: Any) -> bytes:
        who = signed_in(self.needs, request)
        if who is None:
            request.redirect(b"/signin")
            return b""
        return self.show(request, who)

    def show(self, request: Any, who: SignedIn) -> bytes:
        raise NotImplementedError

