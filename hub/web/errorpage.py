"""Small, plain error pages for the web side (the console's layout wraps them later)."""

from __future__ import annotations

from html import escape

from twisted.web import http
from twisted.web.server import Request


def error_page(request: Request, code: int, text: str) -> bytes:
    """Set `code` on `request` and return a short HTML page that says `text`."""
    phrase = http.RESPONSES.get(code, b"Error").decode("ascii", "replace")
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    body = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{code} {phrase}"
            f"</title></head>\n<body><h1>{code} {escape(phrase)}</h1>\n<p>{escape(text)}</p>"
            f"</body></html>\n")
    return body.encode()
