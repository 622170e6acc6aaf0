"""Bad input to the console: malformed HTTP, oversized headers and bodies, traversal,
errors; and the security headers on its pages."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from web_console import Console, parse

from hub.web.site import console_site


@pytest.fixture
def console(tmp_path: Path) -> Console:
    c = Console(tmp_path)
    c.add_operator("alice", "alice-pw", ["site-*"])
    c.add_node("site-a")
    return c


def test_security_headers_on_pages(console: Console) -> None:
    r = console.browser().get("/signin")
    assert r.header("content-security-policy", ).startswith("default-src 'self'")  # type: ignore[union-attr]
    assert "frame-ancestors 'none'" in r.header("content-security-policy")  # type: ignore[operator]
    assert r.header("x-frame-options") == "DENY"
    assert r.header("referrer-policy") == "no-referrer"
    assert r.header("x-content-type-options") == "nosniff"
    assert r.header("strict-transport-security") == "max-age=31536000"


def test_no_hsts_over_plain_http(tmp_path: Path) -> None:
    r = Console(tmp_path, tls=False).browser().get("/signin")
    assert r.header("strict-transport-security") is None
    assert r.header("x-frame-options") == "DENY"


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad header line\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(600)) + b"\r\n",
    b"POST /signin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_http_is_a_400_page(console: Console, raw: bytes) -> None:
    r = console.browser().request("GET", "/", raw=raw)
    assert r.status == 400 and b"<h1>400 Bad request</h1>" in r.body
    assert b"Traceback" not in r.body


def test_oversized_bodies_are_refused_with_413(console: Console) -> None:
    b = console.browser()
    big = b"user=alice&password=" + b"x" * 70000
    r = b.request("POST", "/signin", big)
    assert r.status == 413 and b"at most 65536 bytes" in r.body
    chunks = b"".join(b"%x\r\n%s\r\n" % (8192, b"y" * 8192) for _ in range(10))
    raw = (b"POST /signin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunks + b"0\r\n\r\n")
    assert b.request("POST", "/signin", raw=raw).status == 413
    assert b.request("POST", "/signin", b"user=alice&password=nope").status == 401


@pytest.mark.parametrize("path", [
    "/static/../web/site.py", "/static/..%2fsite.py", "/static/%2e%2e/site.py",
    "/static/.hidden", "/static/%2fetc%2fpasswd", "/static/console.css/x/..",
    "/static/nosuch.css", "/static/", "/static/..%5csite.py",
])
def test_static_traversal_is_refused(console: Console, path: str) -> None:
    r = console.browser().get(path)
    assert r.status == 404, (path, r.status)
    assert b"import" not in r.body and b"root:" not in r.body


def test_static_files_are_served(console: Console) -> None:
    r = console.browser().get("/static/console.css")
    assert r.status == 200 and r.header("content-type", ).startswith("text/css")  # type: ignore[union-attr]
    assert console.browser().get("/static/live.js").status == 200


def test_unknown_pages_and_expired_sessions(console: Console) -> None:
    b = console.browser()
    r = b.get("/nosuch")
    assert r.status == 404 and b"<h1>404 Not found</h1>" in r.body
    assert b.get("/nodes.json").status == 401
    b.cookie = "expired-or-made-up"
    assert b.get("/nodes").header("location") == "/signin"
    assert b.get("/nodes/site-a").status == 401
    assert b.post("/nodes/site-a/access", {"value": "on"}).status == 401


def test_an_error_while_rendering_is_a_500_page_without_traceback(console: Console) -> None:
    def broken(reach: object, node: str) -> object:
        raise RuntimeError("boom")

    console.site = console_site(attrs.evolve(console.needs, proxy=broken))
    b = console.browser()
    b.sign_in("alice", "alice-pw")
    r = b.get("/nodes/site-a/web/")
    assert r.status == 500 and b"<h1>500 Internal error</h1>" in r.body
    assert b"Traceback" not in r.body and b"boom" not in r.body


def test_mount_points_get_the_operators_reach(console: Console) -> None:
    from twisted.web.resource import Resource

    seen: list[tuple[str, str]] = []

    class Echo(Resource):
        isLeaf = True

        def render_GET(self, request: object) -> bytes:
            return b"mounted"

    def factory(reach: object, node: str) -> Resource:
        seen.append((reach.actor, node))  # type: ignore[attr-defined]
        return Echo()

    console.site = console_site(attrs.evolve(console.needs, terminal=factory, proxy=factory))
    b = console.browser()
    b.sign_in("alice", "alice-pw")
    assert b.get("/nodes/site-a/terminal").body == b"mounted"
    assert b.get("/nodes/site-a/web/a/b?c=1").body == b"mounted"
    assert seen == [("alice@192.0.2.7", "site-a")] * 2
    assert parse(b"HTTP/1.1 200 OK\r\n\r\n").status == 200


def test_cross_site_requests_are_refused_by_fetch_metadata(console: Console) -> None:
    b = console.browser()
    assert b.post("/signin", {"user": "alice", "password": "alice-pw"},
                  headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    assert b.post("/signin", {"user": "alice", "password": "alice-pw"},
                  headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"}).status == 303
    token = b.csrf()
    assert b.post("/nodes/site-a/access", {"value": "on", "csrf": token},
                  headers={"Sec-Fetch-Site": "same-site"}).status == 403
