"""The console's HTTP site: the request and channel with our bounds, the headers
every console response carries, and the resource tree (the router).

    /                       -> /nodes (or /signin)
    /signin, /signin/TOKEN  sign-in with a password or a one-time link (signin)
    /signout                POST: end the session
    /nodes, /nodes.json     the node list and its JSON view for live refresh (pages)
    /nodes/NAME             the node page; POST …/access, …/approve, …/revoke, …/remove
    /nodes/NAME/terminal    the web terminal (a factory passed in; 404 without)
    /nodes/NAME/web/…       the device web UI proxy (a factory passed in; 404 without)
    /audit                  the audit log (audit)
    /static/…               our static files (static)
"""

from __future__ import annotations

import io
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from hub.web.audit import AuditPage
from hub.web.errors import ErrorResource, raw_response, send_error
from hub.web.html import error_page
from hub.web.needs import WebNeeds
from hub.web.nodes import NodesResource
from hub.web.pages import NodesJSON
from hub.web.signin import SignIn, SignOut
from hub.web.static import StaticFiles

log = Logger()

# Form posts are small; the device web UI proxy streams its own bodies and
# gets a larger bound (its module may lower it).
MAX_BODY = 64 * 1024
MAX_PROXY_BODY = 16 * 1024 * 1024

SECURITY_HEADERS = (
    (b"content-security-policy",
     b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000")
# What the device web UI proxy decides for a device's pages itself.
DEVICE_PAGE_OWN = frozenset({b"content-security-policy", b"x-frame-options"})


def _proxied(path: bytes) -> bool:
    parts = path.split(b"?", 1)[0].split(b"/")
    return len(parts) > 4 and parts[1] == b"nodes" and parts[3] == b"web"


class ConsoleRequest(server.Request):
    """A request with a bounded body; a failure is our 500 page, never a traceback."""

    def gotLength(self, length: int | None) -> None:
        path = getattr(self.channel, "_path", b"") or b""
        self.body_limit = MAX_PROXY_BODY if _proxied(path) else MAX_BODY
        self.body_seen = 0
        self.refused = False
        if length is not None and length > self.body_limit:
            self._too_large()
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.body_seen += len(data)
        if self.body_seen > self.body_limit:
            self._too_large()
            return
        server.Request.handleContentChunk(self, data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if getattr(self, "refused", False):
            return  # answered with 413 already; the connection is closing
        server.Request.requestReceived(self, command, path, version)

    def _too_large(self) -> None:
        self.refused = True
        self.content = io.BytesIO()
        peer = getattr(self.getClientAddress(), "host", "?")
        log.info("web: request body from {peer} over {limit} bytes refused", peer=peer,
                 limit=self.body_limit)
        transport: Any = self.channel.transport
        transport.write(raw_response(413, "Payload Too Large", error_page(
            413, "Request too large", f"A request body may be at most {self.body_limit} bytes.")))
        self.channel.loseConnection()

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        log.failure("web: error rendering {path}", failure=reason,
                    path=self.path.decode("latin-1", "replace"))
        if self.finished or self._disconnected:
            return
        body = send_error(self, 500, "The hub could not answer this request; "
                          "the error is in its log.")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()


class ConsoleChannel(http.HTTPChannel):
    """Malformed HTTP (a bad request line, too many or too long headers) gets a
    400 page in our layout, then the connection is closed."""

    def lineLengthExceeded(self, line: bytes) -> None:
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        transport: Any = self.transport
        peer = getattr(transport.getPeer(), "host", "?")
        log.info("web: malformed HTTP request from {peer}", peer=peer)
        transport.write(raw_response(400, "Bad Request", error_page(
            400, "Bad request", "The request was not valid HTTP or its headers were too large.")))
        self.loseConnection()


class Root(Resource):
    """The router: security headers on every response, then one resource per path."""

    def __init__(self, needs: WebNeeds) -> None:
        super().__init__()
        self.needs = needs
        self.static = StaticFiles()
        self.nodes = NodesResource(needs)

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        # A device's own page gets the proxy's sandbox policy instead of the console's,
        # which would forbid its inline scripts and styles (hub.web.proxy).
        device_page = _proxied(request.uri)
        for name, value in SECURITY_HEADERS:
            if not (device_page and name in DEVICE_PAGE_OWN):
                request.setHeader(name, value)
        if self.needs.tls:
            request.setHeader(*HSTS)
        if path == b"static":
            return self.static
        request.setHeader(b"cache-control", b"no-store")
        if path == b"":
            return Redirect(b"/nodes")
        if path == b"signin":
            return SignIn(self.needs)
        if path == b"signout":
            return SignOut(self.needs)
        if path == b"nodes":
            return self.nodes
        if path == b"nodes.json":
            return NodesJSON(self.needs)
        if path == b"audit":
            return AuditPage(self.needs)
        return ErrorResource(404, "There is no such page on this hub.")


class Redirect(Resource):
    isLeaf = True

    def __init__(self, to: bytes) -> None:
        super().__init__()
        self.to = to

    def render(self, request: Any) -> bytes:
        request.redirect(self.to)
        return b""


def console_site(needs: WebNeeds) -> server.Site:
    site = server.Site(Root(needs))
    site.requestFactory = ConsoleRequest
    site.protocol = ConsoleChannel  # type: ignore[method-assign,assignment]
    site.displayTracebacks = False
    site.noisy = False
    site.sessionFactory = None  # type: ignore[assignment] # our own sessions only
    return site
