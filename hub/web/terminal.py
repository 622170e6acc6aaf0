"""The web terminal's resources: its page at /nodes/NAME/terminal and its WebSocket below.

The console's router builds them for each request with the signed-in
operator's `OperatorReach` (`terminal_resource`); they check nothing else.
The page is static HTML that loads xterm.js (shipped under
/static/vendor/xterm/, see docs/web-terminal.md) and our terminal.js, with no
inline script. The WebSocket (`socket`) accepts only a same-origin handshake
and then runs a `WebTerminal`.
"""

from __future__ import annotations

import html
from urllib.parse import quote, urlsplit

from twisted.logger import Logger
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.websocket import WebSocketResource

from hub.access.reach import OperatorReach
from hub.ssh.connection import ChannelRefused
from hub.web.later import render_later
from hub.web.terminal_session import (
    DEFAULT_SIZE,
    ControlError,
    WebTerminal,
    terminal_size,
)

log = Logger()

# Inline styles only because xterm.js's DOM renderer adds <style> elements for
# its theme and cell size; scripts come from this origin alone.
CSP = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="/static/vendor/xterm/xterm.css">
<link rel="stylesheet" href="/static/terminal.css">
<script src="/static/vendor/xterm/xterm.js" defer></script>
<script src="/static/vendor/xterm/addon-fit.js" defer></script>
<script src="/static/terminal.js" defer></script>
</head>
<body>
<div id="terminal" data-socket="{socket}"></div>
<noscript><p>The web terminal needs JavaScript. Without it: ssh {user}:{node}@hub</p></noscript>
</body>
</html>
"""


def terminal_resource(reach: OperatorReach, node: str) -> IResource:
    """`/nodes/NODE/terminal` (the page) and `/nodes/NODE/terminal/socket` (the
    WebSocket) for the operator `reach` acts for."""
    return TerminalPage(reach, node)


def send_headers(request: Request, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-security-policy", CSP.encode())
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"referrer-policy", b"same-origin")


class TerminalPage(Resource):
    """The terminal page of one node; `socket` is its WebSocket."""

    def __init__(self, reach: OperatorReach, node: str) -> None:
        Resource.__init__(self)
        self.reach = reach
        self.node = node

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"socket" and not request.postpath:
            return TerminalSocket(self.reach, self.node)
        return NoResource()

    def render_GET(self, request: Request) -> int:
        # The grants are read off the reactor; the page is answered once checked.
        return render_later(request, self.reach.checked(self.node).addCallback(
            self._page, request))

    def _page(self, reach: OperatorReach, request: Request) -> bytes:
        try:
            node = reach.resolve_node(self.node).name
        except ChannelRefused as e:
            log.info("{actor}: web terminal page of {node} refused: {why}",
                     actor=self.reach.actor, node=self.node, why=e.text)
            request.setResponseCode(404)
            send_headers(request, b"text/plain; charset=utf-8")
            return f"{e.text}\n".encode()
        send_headers(request, b"text/html; charset=utf-8")
        return PAGE.format(
            title=html.escape(f"{node} — callhomehub terminal"),
            socket=html.escape(f"/nodes/{quote(node, safe='')}/terminal/socket"),
            user=html.escape(self.reach.login.user), node=html.escape(node),
        ).encode()


def origin_refusal(request: Request) -> str | None:
    """Why the handshake's Origin is not this console's own (cross-site WebSocket
    hijacking), or None. Only host and port are compared, so a console behind a
    TLS-terminating proxy (`Host: hub`, `Origin: https://hub`) still matches."""
    raw_origin, raw_host = request.getHeader(b"origin"), request.getHeader(b"host")
    if raw_origin is None:
        return "no Origin header"
    if raw_host is None:
        return "no Host header"
    origin, host = raw_origin.decode("latin-1"), raw_host.decode("latin-1")
    try:
        seen = urlsplit(origin)
        ours = urlsplit(f"//{host}")
        default = {"http": 80, "https": 443}.get(seen.scheme.lower())
        # A Host without a port is the default port of the scheme the browser used.
        seen_port = seen.port or default
        our_port = ours.port or default
    except ValueError:
        return f"malformed Origin {origin!r}"
    if (seen.hostname is None or default is None or seen.hostname != ours.hostname
            or seen_port != our_port):
        return f"Origin {origin!r} is not this site ({host})"
    return None


class TerminalSocket(WebSocketResource):
    """The WebSocket of one node's terminal; `?cols=&rows=` give the first size."""

    def __init__(self, reach: OperatorReach, node: str) -> None:
        WebSocketResource.__init__(self, self)  # type: ignore[arg-type]
        self.reach = reach
        self.node = node

    def render_GET(self, request: Request) -> bytes | int:
        why = origin_refusal(request)
        if why is not None:
            log.warn("{actor}: web terminal socket of {node} refused: {why}",
                     actor=self.reach.actor, node=self.node, why=why)
            request.setResponseCode(403)
            send_headers(request, b"text/plain; charset=utf-8")
            return b"cross-site WebSocket refused\n"
        self._built: WebTerminal | None = None
        result = WebSocketResource.render_GET(self, request)
        if self._built is not None and result is NOT_DONE_YET:
            # The upgrade has pointed the channel's dataReceived at the WebSocket
            # (Twisted's private _protocolUpgradeForWebsockets); the e2e test
            # test_a_message_too_large_to_gather_ends_the_session fails if it stops.
            self._built.guard(request.channel)
        return result

    def buildProtocol(self, request: Request) -> WebTerminal:
        self._built = WebTerminal(self.reach, self.node, first_size(request), request)
        return self._built


def first_size(request: Request) -> tuple[int, int]:
    """The size in the query, or 80x24 when it is missing or not a size."""
    args = request.args or {}
    try:
        return terminal_size(int(args[b"cols"][0]), int(args[b"rows"][0]))
    except (KeyError, IndexError, ValueError, ControlError):
        return DEFAULT_SIZE
