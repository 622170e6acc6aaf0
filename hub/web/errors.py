"""Error pages in the console's layout: every 4xx and 5xx the console sends."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource

from hub.web.html import Viewer, error_page

TITLES = {400: "Bad request", 401: "Sign-in needed", 403: "Forbidden", 404: "Not found",
          405: "Method not allowed", 413: "Request too large", 429: "Too many attempts",
          500: "Internal error", 502: "Bad gateway", 503: "Node offline",
          504: "Gateway timeout"}


def send_error(request: Any, code: int, message: str, viewer: Viewer | None = None) -> bytes:
    """Set the status and type of `request` and return the error page to write."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return error_page(code, TITLES.get(code, "Error"), message, viewer)


class ErrorResource(Resource):
    """Answers any method and any path below it with one error page."""

    isLeaf = True

    def __init__(self, code: int, message: str, viewer: Viewer | None = None) -> None:
        super().__init__()
        self.code = code
        self.message = message
        self.viewer = viewer

    def render(self, request: Any) -> bytes:
        return send_error(request, self.code, self.message, self.viewer)


def raw_response(code: int, reason: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response with `Connection: close`, for the channel to send
    when a request is refused before it reached a resource."""
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode() + body
