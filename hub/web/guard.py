"""Who is signed in on a request: the session cookie, checked against the registry.

The operator's row is read on every request: a deleted operator, a changed
password or key (`hub.access.operators.lapsed`) ends the session at once, and
the admin mark and grants in force are those of now. The session row, the
operator's row and the grants are read together in the hub's registry thread
(`read_visit`), never on the reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource

from hub.access.grants import GrantsSnapshot
from hub.access.operators import lapsed
from hub.access.reach import OperatorReach
from hub.errors import NotFound
from hub.store.registry import Registry
from hub.store.rows import User
from hub.store.websessions import WebSessionRow
from hub.web.html import Viewer
from hub.web.later import render_later
from hub.web.needs import WebNeeds
from hub.web.sessions import BROWSE_COOKIE, COOKIE, WebSession, derived

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


@frozen
class Visit:
    """What the guard reads for a request, in one call in the registry thread: the
    session row its cookie names and, with one, the operator's grants."""

    row: WebSessionRow | None
    by_browse: bool                # found by the proxy cookie
    grants: GrantsSnapshot | None  # the user row, the pairs, their members, `names`


def read_visit(registry: Registry, session_id: str, browse: str,
               fresh: Callable[[WebSessionRow], bool], names: tuple[str, ...]) -> Visit:
    """In the registry thread: the session of the console cookie (or, if it has none
    that is `fresh`, of the proxy cookie), its operator's row, the pairs with their
    members and the nodes `names`."""
    row = registry.web_session(session_id) if session_id else None
    by_browse = False
    if (row is None or not fresh(row)) and browse:
        other = registry.web_session_by_browse(browse)
        if other is not None:
            row, by_browse = other, True
    if row is None:
        return Visit(None, by_browse, None)
    try:
        user: User | None = registry.user(row.login.user)
    except NotFound:
        user = None
    pairs = registry.pairs()
    nodes = {}
    for name in (*names, *(m for p in pairs for m in p.members)):
        if name.lower() not in nodes:
            try:
                nodes[name.lower()] = registry.node(name)
            except NotFound:
                pass
    return Visit(row, by_browse, GrantsSnapshot(user, pairs, nodes))


def signed_in(needs: WebNeeds, request: Any, browse: bool = False,
              names: tuple[str, ...] = ()) -> defer.Deferred[SignedIn | None]:
    """The operator signed in on `request`, read off the reactor with the nodes
    `names` (for the page to show); with `browse` (a device web UI path), the
    proxy cookie stands in for the console cookie."""
    cookie = request.getCookie(COOKIE)
    session_id = cookie.decode("ascii", "replace") if cookie else ""
    token = request.getCookie(BROWSE_COOKIE) if browse else None
    browse_token = token.decode("ascii", "replace") if token else ""
    store = needs.sessions
    now = store.clock.seconds()
    address = source(request)

    def decide(visit: Visit) -> SignedIn | None:
        if visit.row is None or visit.grants is None:
            return None
        if visit.by_browse:
            session = store.live(visit.row, browse_token, None)
            if session is not None and not _from_a_device_page(request):
                log.info("web: device web UI request from another site ({origin}) refused",
                         origin=request.getHeader(b"origin"))
                return None
        else:
            session = store.live(visit.row, derived(session_id, "browse"), session_id)
        if session is None:
            return None
        grants = visit.grants
        grants.write_audit = needs.gateway.grants.audit
        user = grants.operator
        why = lapsed(session.login, user)
        if why is not None or user is None:
            log.info("{why}: ending its web session", why=why)
            store.end(session)
            return None
        reach = OperatorReach(needs.gateway, session.login, lambda: address, grants)
        # The grants as the SSH side reads them: a pair's grant covers its members.
        return SignedIn(session, reach.user() or user, reach)

    return needs.calls.call(read_visit, session_id, browse_token,
                            lambda row: store.fresh(row, now), names).addCallback(decide)


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

    def render_GET(self, request: Any) -> int:
        def show(who: SignedIn | None) -> bytes | defer.Deferred[bytes]:
            if who is None:
                request.redirect(b"/signin")
                return b""
            return self.show(request, who)

        return render_later(request, signed_in(self.needs, request), show)

    def show(self, request: Any, who: SignedIn) -> bytes | defer.Deferred[bytes]:
        """The page: its reads made in one registry call, then rendered."""
        raise NotImplementedError

