"""The device web UI proxy's rules: which headers pass, and how a device's answer is
rewritten to live under `/nodes/NAME/web/` in the console's origin.

Values in, values out: headers are lists of (name, value) byte pairs, as they were
on the wire. The proxy itself (hub.web.proxy) carries these decisions out.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from attrs import field, frozen

# RFC 9110 7.6.1, plus the old `Proxy-Connection` and `Keep-Alive` that are never end to end.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# What the browser sends that a device must not see or must not be able to forge:
# the hub sets its own X-Forwarded-* and Host; the CSRF token is the console's.
REQUEST_DROPPED = frozenset({
    b"host", b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-prefix", b"x-csrf-token",
})
# What a device must not say for the console's origin: HSTS and Clear-Site-Data act on
# the whole origin (Clear-Site-Data would sign the operator out of the console).
RESPONSE_DROPPED = frozenset({
    b"strict-transport-security", b"clear-site-data", b"alt-svc", b"service-worker-allowed",
    b"public-key-pins", b"content-length-range",
})
# Cookie names the console relies on: a device may neither read nor set them.
CONSOLE_COOKIE_PREFIXES = ("__host-", "__secure-")
# The device's pages run in an opaque origin: scripts and forms work, but nothing they
# run can use the console's cookie, storage or pages (see docs/web-proxy.md).
SANDBOX_POLICY = (b"sandbox allow-scripts allow-forms allow-popups allow-modals "
                  b"allow-downloads allow-popups-to-escape-sandbox; frame-ancestors 'self'")
# The Host a device is sent: it does not know the hub's name, and embedded web servers
# answer `localhost` (the forward's far end usually is localhost:PORT on the device).
DEVICE_HOST = b"localhost"
# The authorities an absolute Location may name and still mean the device itself.
DEVICE_AUTHORITIES = frozenset({"localhost", "127.0.0.1", "[::1]"})

Headers = list[tuple[bytes, bytes]]


@frozen
class ProxySettings:
    """The proxy's bounds (config file section [web_proxy])."""

    max_body: int = 16 * 1024 * 1024   # request bodies larger than this get 413
    timeout: float = 30.0              # seconds for the device to answer with headers
    sandbox: bool = True               # Content-Security-Policy: sandbox on device pages
    audit_interval: float = 600.0      # one `browse` audit entry per operator, node and interval

    def __attrs_post_init__(self) -> None:
        if self.max_body < 0:
            raise ValueError("max_body must be >= 0")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        if self.audit_interval < 0:
            raise ValueError("audit_interval must be >= 0")


@frozen
class Rewritten:
    """A device response's headers as the browser gets them, and what was dropped (logged)."""

    headers: Headers
    dropped_cookies: tuple[str, ...] = field(default=())


def prefix_of(node: str) -> str:
    return f"/nodes/{node}/web"


def connection_named(headers: Headers) -> set[bytes]:
    """The header names a `Connection` header lists: hop-by-hop for this message too."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return named


def is_console_cookie(name: str) -> bool:
    return name.strip().lower().startswith(CONSOLE_COOKIE_PREFIXES)


def strip_console_cookies(value: bytes) -> bytes:
    """A `Cookie` header less the console's cookies (`__Host-…`, `__Secure-…`)."""
    kept = [c.strip() for c in value.split(b";")
            if c.strip() and not is_console_cookie(c.split(b"=", 1)[0].decode("latin-1"))]
    return b"; ".join(kept)


def request_headers(headers: Headers, *, client: str, proto: str, host: bytes,
                    prefix: str) -> Headers:
    """The browser's request headers as the device gets them."""
    skip = HOP_BY_HOP | REQUEST_DROPPED | connection_named(headers)
    out: Headers = []
    for name, value in headers:
        lower = name.lower()
        if lower in skip:
            continue
        if lower == b"cookie":
            value = strip_console_cookies(value)
            if not value:
                continue
        out.append((name, value))
    out += [(b"Host", DEVICE_HOST), (b"X-Forwarded-For", client.encode()),
            (b"X-Forwarded-Proto", proto.encode()), (b"X-Forwarded-Host", host),
            (b"X-Forwarded-Prefix", prefix.encode())]
    return out


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4: `..` never climbs above the device's root."""
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def device_target(segments: list[bytes], query: bytes | None) -> bytes:
    """The request target sent to the device: the raw path below the prefix, dot
    segments resolved, and the query string as the browser sent it."""
    path = remove_dot_segments("/" + "/".join(s.decode("latin-1") for s in segments))
    target = path.encode("latin-1")
    return target + b"?" + query if query is not None else target


def rewrite_location(value: bytes, prefix: str, hub_host: bytes) -> bytes:
    """A device's redirect as a URL under the prefix: path-absolute (`/x`) and
    device-absolute (`http://localhost/x`, or the hub's own host) become
    `/nodes/NAME/web/x`; relative ones and other sites are left alone."""
    text = value.decode("latin-1").strip()
    if text.startswith("//"):
        parts = urlsplit(text)
    elif text.startswith("/"):
        return (prefix + text).encode("latin-1")
    else:
        parts = urlsplit(text)
        if parts.scheme.lower() not in ("http", "https"):
            return value  # relative (`x`, `?q`), or another scheme
    authorities = DEVICE_AUTHORITIES | {hub_host.decode("latin-1").lower()}
    netloc = parts.netloc.lower()
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    if netloc not in authorities and host not in authorities:
        return value
    rest = parts.path or "/"
    if parts.query:
        rest += "?" + parts.query
    if parts.fragment:
        rest += "#" + parts.fragment
    return (prefix + rest).encode("latin-1")


def rewrite_set_cookie(value: bytes, prefix: str, secure: bool) -> bytes | None:
    """A device's Set-Cookie scoped under the prefix, or None to drop it (a console
    cookie name). `Domain` goes; `Path` is put under the prefix; on HTTPS the cookie
    becomes `SameSite=None; Secure` so the sandboxed page still sends it."""
    text = value.decode("latin-1")
    first, _, attributes = text.partition(";")
    name = first.split("=", 1)[0].strip()
    if not name or is_console_cookie(name):
        return None
    path = "/"
    kept: list[str] = []
    for attribute in attributes.split(";"):
        key, _, val = attribute.strip().partition("=")
        lower = key.strip().lower()
        if not lower or lower in ("domain", "samesite", "secure", "partitioned"):
            continue
        if lower == "path":
            path = val.strip() if val.strip().startswith("/") else "/"
            continue
        kept.append(attribute.strip())
    parts = [first.strip(), *kept, f"Path={prefix}{path}"]
    if secure:
        parts += ["SameSite=None", "Secure"]
    return "; ".join(parts).encode("latin-1")


def response_headers(headers: Headers, *, prefix: str, hub_host: bytes, secure: bool,
                     sandbox: bool) -> Rewritten:
    """A device response's headers as the browser gets them."""
    skip = HOP_BY_HOP | RESPONSE_DROPPED | connection_named(headers)
    out: Headers = []
    dropped: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower in skip:
            continue
        if lower in (b"location", b"content-location"):
            value = rewrite_location(value, prefix, hub_host)
        elif lower == b"set-cookie":
            cookie = rewrite_set_cookie(value, prefix, secure)
            if cookie is None:
                dropped.append(value.split(b"=", 1)[0].decode("latin-1").strip())
                continue
            value = cookie
        out.append((name, value))
    if sandbox:
        out.append((b"Content-Security-Policy", SANDBOX_POLICY))
    return Rewritten(out, tuple(dropped))


# HTML bodies up to this size are rewritten (a device's pages are small; a larger one
# streams as it came).
HTML_REWRITE_MAX = 1024 * 1024
_HTML_TYPES = (b"text/html", b"application/xhtml+xml")
_URL_ATTRIBUTES = rb"href|src|action|formaction|poster|background|data"


def rewrites_html(headers: Headers) -> bool:
    """Whether a response's body is HTML the proxy can rewrite (not compressed)."""
    kind = encoding = b""
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-type":
            kind = value.split(b";")[0].strip().lower()
        elif lower == b"content-encoding":
            encoding = value.strip().lower()
    return kind in _HTML_TYPES and encoding in (b"", b"identity")


def rewrite_html(body: bytes, prefix: str) -> bytes:
    """Path-absolute URLs in a page's tag attributes (`<a href="/status">`, `<form
    action="/cgi-bin/x">`, `<meta http-equiv=refresh content="0; url=/x">`) moved under
    `prefix`, so that a device page's own links stay on the device. Protocol-relative
    (`//host/x`) and relative URLs, and those already under the prefix, are left alone;
    scripts that build URLs at run time cannot be rewritten (docs/web-proxy.md)."""
    under = re.escape(prefix.encode().lstrip(b"/") + b"/")
    new = prefix.encode() + b"/"
    attribute = re.compile(
        rb"(<[a-zA-Z][^<>]*?\s(?:" + _URL_ATTRIBUTES + rb")\s*=\s*[\"']?)/(?![/\\]|" + under
        + rb")", re.IGNORECASE)
    refresh = re.compile(rb"(<meta\s[^<>]*?content\s*=\s*[\"']?\s*\d+\s*;\s*url\s*=\s*[\"']?)"
                         rb"/(?![/\\]|" + under + rb")", re.IGNORECASE)
    previous = None
    while previous != body:  # a tag with several URL attributes: one per pass
        previous = body
        body = attribute.sub(lambda m: m.group(1) + new, body)
    return refresh.sub(lambda m: m.group(1) + new, body)
