"""The device web UI proxy's header and URL rules, as plain values."""

from __future__ import annotations

import pytest

from hub.rules.webproxy import (
    SANDBOX_POLICY,
    ProxySettings,
    device_target,
    remove_dot_segments,
    request_headers,
    response_headers,
    rewrite_location,
    rewrite_set_cookie,
    strip_console_cookies,
)

P = "/nodes/r1/web"


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def test_request_headers_drop_hop_by_hop_and_set_host_and_forwarded() -> None:
    out = request_headers(
        [(b"Host", b"hub.example"), (b"Connection", b"keep-alive, X-Secret"),
         (b"X-Secret", b"1"), (b"Keep-Alive", b"5"), (b"TE", b"trailers"),
         (b"Upgrade", b"websocket"), (b"Accept", b"text/html"),
         (b"X-Forwarded-For", b"6.6.6.6"), (b"X-CSRF-Token", b"tok"),
         (b"Authorization", b"Basic eDp5")],
        client="10.0.0.9", proto="https", host=b"hub.example", prefix=P)
    d = dict((n.lower(), v) for n, v in out)
    assert b"connection" not in d and b"x-secret" not in d and b"keep-alive" not in d
    assert b"te" not in d and b"upgrade" not in d and b"x-csrf-token" not in d
    assert d[b"host"] == b"localhost"
    assert d[b"x-forwarded-for"] == b"10.0.0.9"  # ours, not the forged one
    assert names(out).count(b"x-forwarded-for") == 1
    assert d[b"x-forwarded-proto"] == b"https"
    assert d[b"x-forwarded-host"] == b"hub.example"
    assert d[b"x-forwarded-prefix"] == P.encode()
    assert d[b"accept"] == b"text/html" and d[b"authorization"] == b"Basic eDp5"


def test_console_cookie_never_reaches_the_device() -> None:
    assert strip_console_cookies(b"a=1; __Host-chh-session=SECRET; b=2") == b"a=1; b=2"
    assert strip_console_cookies(b"__host-chh-session=S; __Secure-x=y") == b""
    out = request_headers([(b"Cookie", b"__Host-chh-session=SECRET")], client="c",
                          proto="https", host=b"h", prefix=P)
    assert b"cookie" not in names(out)
    out = request_headers([(b"Cookie", b"sid=1; __Host-chh-session=SECRET")], client="c",
                          proto="https", host=b"h", prefix=P)
    assert (b"Cookie", b"sid=1") in out


@pytest.mark.parametrize(("location", "expected"), [
    (b"/login", b"/nodes/r1/web/login"),
    (b"/", b"/nodes/r1/web/"),
    (b"http://localhost/a?b=1#c", b"/nodes/r1/web/a?b=1#c"),
    (b"http://localhost:8080/a", b"/nodes/r1/web/a"),
    (b"https://127.0.0.1", b"/nodes/r1/web/"),
    (b"http://[::1]:80/x", b"/nodes/r1/web/x"),
    (b"https://hub.example/setup", b"/nodes/r1/web/setup"),
    (b"//localhost/x", b"/nodes/r1/web/x"),
    (b"page2.html", b"page2.html"),
    (b"?q=1", b"?q=1"),
    (b"https://vendor.example/help", b"https://vendor.example/help"),
    (b"//vendor.example/help", b"//vendor.example/help"),
])
def test_location_rewriting(location: bytes, expected: bytes) -> None:
    assert rewrite_location(location, P, b"hub.example") == expected


def test_set_cookie_scoped_under_the_prefix_without_domain() -> None:
    assert rewrite_set_cookie(b"sid=abc; Path=/; Domain=device.lan; HttpOnly", P, True) == (
        b"sid=abc; HttpOnly; Path=/nodes/r1/web/; SameSite=None; Secure")
    assert rewrite_set_cookie(b"sid=abc", P, False) == b"sid=abc; Path=/nodes/r1/web/"
    assert rewrite_set_cookie(b"x=1; path=/cgi-bin; Max-Age=60", P, False) == (
        b"x=1; Max-Age=60; Path=/nodes/r1/web/cgi-bin")
    assert rewrite_set_cookie(b"x=1; Path=relative", P, False) == b"x=1; Path=/nodes/r1/web/"


@pytest.mark.parametrize("cookie", [
    b"__Host-chh-session=forged; Path=/; Secure", b"__host-chh-session=forged",
    b"__Secure-x=1; Secure", b"=nameless",
])
def test_console_cookie_names_are_not_settable(cookie: bytes) -> None:
    assert rewrite_set_cookie(cookie, P, True) is None


def test_response_headers() -> None:
    out = response_headers(
        [(b"Location", b"/x"), (b"Set-Cookie", b"__Host-chh-session=forged; Path=/"),
         (b"Set-Cookie", b"sid=1"), (b"Transfer-Encoding", b"chunked"),
         (b"Connection", b"close"), (b"Strict-Transport-Security", b"max-age=99"),
         (b"Clear-Site-Data", b'"cookies"'), (b"Content-Type", b"text/html")],
        prefix=P, hub_host=b"hub", secure=True, sandbox=True)
    assert out.dropped_cookies == ("__Host-chh-session",)
    assert out.headers == [
        (b"Location", b"/nodes/r1/web/x"),
        (b"Set-Cookie", b"sid=1; Path=/nodes/r1/web/; SameSite=None; Secure"),
        (b"Content-Type", b"text/html"),
        (b"Content-Security-Policy", SANDBOX_POLICY)]
    unsandboxed = response_headers([], prefix=P, hub_host=b"hub", secure=True, sandbox=False)
    assert unsandboxed.headers == []


@pytest.mark.parametrize(("path", "expected"), [
    ("/", "/"), ("/a/b", "/a/b"), ("/a/../b", "/b"), ("/../../etc/passwd", "/etc/passwd"),
    ("/a/./b/", "/a/b/"), ("/a/..", "/"), ("/a/b/.", "/a/b/"),
])
def test_dot_segments_never_climb_above_the_device_root(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


def test_device_target_keeps_the_raw_path_and_query() -> None:
    assert device_target([b"cgi-bin", b"a%20b"], b"x=1&y=%2F") == b"/cgi-bin/a%20b?x=1&y=%2F"
    assert device_target([b""], None) == b"/"
    assert device_target([b"..", b"..", b"etc"], None) == b"/etc"


def test_settings_bounds() -> None:
    with pytest.raises(ValueError, match="max_body"):
        ProxySettings(max_body=-1)
    with pytest.raises(ValueError, match="timeout"):
        ProxySettings(timeout=0)


def test_rewrite_html_moves_path_absolute_urls_in_tags_under_the_prefix() -> None:
    from hub.rules.webproxy import rewrite_html, rewrites_html

    prefix = "/nodes/r1/web"
    page = (b'<A HREF="/a">a</A> <img src=/b.png alt="/not-a-url"> '
            b"<link rel=stylesheet href='/c.css'><script src=\"/d.js\"></script>"
            b'<meta http-equiv="refresh" content="5; url=/login">'
            b'<a href="//cdn/x">cdn</a> <a href="rel/y">rel</a> <a href="/nodes/r1/web/z">z</a>'
            b"<p>text /with/slashes and <b>bold</b></p><input formaction=/e data-url=\"/f\">")
    assert rewrite_html(page, prefix) == (
        b'<A HREF="/nodes/r1/web/a">a</A> <img src=/nodes/r1/web/b.png alt="/not-a-url"> '
        b"<link rel=stylesheet href='/nodes/r1/web/c.css'>"
        b'<script src="/nodes/r1/web/d.js"></script>'
        b'<meta http-equiv="refresh" content="5; url=/nodes/r1/web/login">'
        b'<a href="//cdn/x">cdn</a> <a href="rel/y">rel</a> <a href="/nodes/r1/web/z">z</a>'
        b"<p>text /with/slashes and <b>bold</b></p>"
        b'<input formaction=/nodes/r1/web/e data-url="/f">')
    assert rewrites_html([(b"Content-Type", b"text/html; charset=UTF-8")])
    assert not rewrites_html([(b"Content-Type", b"text/html"), (b"Content-Encoding", b"br")])
    assert not rewrites_html([(b"Content-Type", b"application/json")])
