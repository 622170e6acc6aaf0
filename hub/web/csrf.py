"""CSRF protection: every state-changing request carries its session's token.

The token is per session (`WebSession.csrf`, derived from its id), sent as the form
field `csrf` or the header `X-CSRF-Token`; a browser's `Origin`, when it sends one,
must be this host.
SameSite=Strict cookies already keep other sites' forms out; this is the second lock.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

from hub.web.sessions import WebSession


def sent_token(request: Any) -> bytes:
    header = request.getHeader(b"x-csrf-token")
    if header:
        return bytes(header.encode() if isinstance(header, str) else header)
    values = (request.args or {}).get(b"csrf") or [b""]
    return bytes(values[0])


def same_origin(request: Any) -> bool:
    """Whether the browser says the request came from our own pages: its
    `Sec-Fetch-Site` if it sends one, else its `Origin` (which is `null` under our
    no-referrer policy in some browsers, and absent in old ones: then the token decides)."""
    site = request.getHeader(b"sec-fetch-site")
    if site:
        return bool(site in (b"same-origin", b"none"))
    origin = request.getHeader(b"origin")
    if not origin or origin == b"null":
        return True
    host = request.getHeader(b"host") or b""
    return bool(urlsplit(origin.decode("latin-1")).netloc.encode("latin-1").lower()
                == host.lower())


def csrf_ok(request: Any, session: WebSession) -> bool:
    return same_origin(request) and hmac.compare_digest(sent_token(request),
                                                        session.csrf.encode())
