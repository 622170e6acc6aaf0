"""The device web UI proxy on an in-memory hub: a Site around the resource, a device
whose forwarded channels answer HTTP, all pumped by hand on a memory reactor."""

from __future__ import annotations

from pathlib import Path

import pytest
from web_proxy_memory import Lab, response

from hub.rules.webproxy import SANDBOX_POLICY, ProxySettings
from hub.ssh.channels import WINDOW

GET = b"GET /nodes/r1/web/%s HTTP/1.1\r\nHost: hub.example\r\n%s\r\n"


def get(path: bytes = b"", extra: bytes = b"") -> bytes:
    return GET % (path, extra)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def test_page_loads_with_query_and_rewritten_headers(lab: Lab) -> None:
    lab.connect((b"http", 0))
    lab.handler = lambda request: response(b"302 Found", (
        b"Location: http://localhost/login?next=%2F", b"Set-Cookie: sid=42; Path=/; Domain=dev",
        b"Set-Cookie: __Host-chh-session=forged; Path=/; Secure",
        b"Strict-Transport-Security: max-age=100"), b"moved")
    browser = lab.browser(get(b"cgi-bin/status.cgi?x=1&y=%2F",
                              b"Cookie: theme=dark; __Host-chh-session=SECRET\r\n"
                              b"X-Forwarded-For: 6.6.6.6\r\nConnection: keep-alive\r\n"))
    assert browser.status() == 302
    assert browser.header(b"location") == [b"/nodes/r1/web/login?next=%2F"]
    assert browser.header(b"set-cookie") == [b"sid=42; Path=/nodes/r1/web/"]
    assert browser.header(b"content-security-policy") == [SANDBOX_POLICY]
    assert browser.header(b"strict-transport-security") == []
    assert browser.body() == b"moved"
    (seen,) = lab.seen
    head = seen.split(b"\r\n")
    assert head[0] == b"GET /cgi-bin/status.cgi?x=1&y=%2F HTTP/1.1"
    assert b"SECRET" not in seen and b"__Host-chh" not in seen
    assert b"Cookie: theme=dark" in head
    assert b"Host: localhost" in head
    assert b"X-Forwarded-For: 203.0.113.7" in head and b"6.6.6.6" not in seen
    assert b"X-Forwarded-Prefix: /nodes/r1/web" in head
    assert b"X-Forwarded-Host: hub.example" in head


def test_post_body_reaches_the_device_and_an_oversized_one_gets_413(tmp_path: Path) -> None:
    lab = Lab(tmp_path, settings=ProxySettings(max_body=100))
    lab.connect((b"http", 0))
    lab.handler = lambda request: response(body=request.partition(b"\r\n\r\n")[2])
    form = b"a=1&b=2"
    ok = lab.browser(b"POST /nodes/r1/web/save HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n\r\n%s"
                     % (len(form), form))
    assert ok.status() == 200 and ok.body() == form
    big = b"x" * 101
    refused = lab.browser(b"PUT /nodes/r1/web/fw HTTP/1.1\r\nHost: h\r\nContent-Length: 101"
                          b"\r\n\r\n" + big)
    assert refused.status() == 413
    assert b"limited to 100 bytes" in refused.body()
    assert len(lab.seen) == 1  # the device never saw the oversized one


def test_bare_prefix_redirects_to_the_directory(lab: Lab) -> None:
    lab.connect((b"http", 0))
    browser = lab.browser(b"GET /nodes/r1/web HTTP/1.1\r\nHost: h\r\n\r\n")
    assert browser.status() == 302
    assert browser.header(b"location") == [b"/nodes/r1/web/"]


def test_dot_segments_stay_on_the_device(lab: Lab) -> None:
    lab.connect((b"http", 0))
    lab.browser(get(b"a/../../../etc/passwd"))
    assert lab.seen[0].startswith(b"GET /etc/passwd HTTP/1.1")


def test_unknown_and_ungranted_nodes_look_the_same(tmp_path: Path) -> None:
    lab = Lab(tmp_path, grants=("other-*",))
    lab.connect((b"http", 0))
    ungranted = lab.browser(get())
    unknown = lab.browser(b"GET /nodes/nosuch/web/ HTTP/1.1\r\nHost: hub.example\r\n\r\n",
                          node="nosuch")
    assert ungranted.status() == unknown.status() == 404
    assert ungranted.body().replace(b"r1", b"X") == unknown.body().replace(b"nosuch", b"X")
    assert lab.seen == []


def test_offline_node_is_503(lab: Lab) -> None:
    browser = lab.browser(get())
    assert browser.status() == 503
    assert b"node r1 is offline" in browser.body()


def test_node_without_a_web_forward_is_404(lab: Lab) -> None:
    lab.connect((b"localhost", 0))  # ssh only
    browser = lab.browser(get())
    assert browser.status() == 404
    assert b"node r1 forwards no web service" in browser.body()


def test_device_refusing_the_connection_is_502(lab: Lab) -> None:
    device = lab.connect((b"http", 0))
    device.conn.refuse_channels = True
    browser = lab.browser(get())
    assert browser.status() == 502
    assert b"refused the connection" in browser.body()


def test_device_that_never_answers_is_504(lab: Lab) -> None:
    lab.connect((b"http", 0))
    lab.handler = lambda request: None
    browser = lab.browser(get())
    assert browser.text == b""
    lab.reactor.advance(lab.settings.timeout + 1)
    lab.flush()
    assert browser.status() == 504
    assert b"did not answer within 30 s" in browser.body()


def test_browse_is_audited_once_per_burst(lab: Lab) -> None:
    lab.connect((b"http", 0))

    def browses() -> list[str]:
        return [e.actor for e in lab.hub.registry.audit_log() if e.action == "browse"]

    for _ in range(3):
        assert lab.browser(get()).status() == 200
    assert browses() == ["alice@203.0.113.7"]
    lab.reactor.advance(601)
    lab.browser(get())
    assert len(browses()) == 2


def test_download_to_a_reader_that_stops_keeps_the_hub_buffer_bounded(lab: Lab) -> None:
    size = 24 * 1024 * 1024
    lab.connect((b"http", 0))
    lab.handler = lambda request: response(body=b"z" * size)
    # The browser's socket is full: the web server pauses its producer (the proxy).
    browser = lab.browser(get(b"firmware.bin"), full=True)
    for _ in range(20):
        lab.flush()
        lab.reactor.advance(0.1)
    # Everything the hub takes while paused is what the device was already granted:
    # one channel window, not the 24 MiB the device wants to send.
    assert 0 < len(browser.body()) <= WINDOW, len(browser.body())
    browser.transport.drain()
    for _ in range(400):
        if len(browser.body()) >= size:
            break
        lab.flush()
    assert browser.body() == b"z" * size


def test_https_forward_is_spoken_over_tls_without_verifying_the_device(lab: Lab) -> None:
    import twisted.test
    from twisted.internet import protocol, ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from hub.tunnel.inprocess import ProtocolChannel

    pem = (Path(twisted.test.__file__).parent / "server.pem").read_bytes()
    options = ssl.PrivateCertificate.loadPEM(pem).options()  # self-signed
    # A server TLS factory on the test's clock (it batches writes on one).

    class Web(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            lab.seen.append(data)
            if b"\r\n\r\n" in data:
                self.transport.write(response(body=b"over tls"))
                self.transport.loseConnection()

    device = lab.connect((b"https", 0))

    def tls(window: int, max_packet: int, data: bytes) -> ProtocolChannel:
        chan = ProtocolChannel(remoteWindow=window, remoteMaxPacket=max_packet)

        chan.protocol = TLSMemoryBIOFactory(
            options, False, protocol.Factory.forProtocol(Web), lab.reactor).buildProtocol(None)
        return chan

    device.conn.channel_forwarded_tcpip = tls
    browser = lab.browser(get(b"status"))
    for _ in range(10):  # the TLS handshake's round trips; TLS flushes on the clock
        lab.reactor.advance(0)
        lab.flush()
    assert browser.status() == 200 and browser.body() == b"over tls"
    assert lab.seen[0].startswith(b"GET /status HTTP/1.1")


def test_a_device_that_does_not_speak_http_is_502(lab: Lab) -> None:
    lab.connect((b"http", 0))
    lab.handler = lambda request: b"SSH-2.0-OpenSSH_9.9\r\n\r\n"
    browser = lab.browser(get())
    assert browser.status() == 502
    assert b"did not answer with valid HTTP" in browser.body()


def test_head_gets_the_headers_and_no_body(lab: Lab) -> None:
    lab.connect((b"http", 0))
    lab.handler = lambda request: response(headers=(b"X-Device: 1",)).replace(
        b"Content-Length: 0", b"Content-Length: 1234")
    browser = lab.browser(b"HEAD /nodes/r1/web/x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert browser.status() == 200
    assert browser.header(b"x-device") == [b"1"]
    assert browser.header(b"content-length") == [b"1234"]
    assert browser.body() == b""


def test_browser_leaving_mid_download_closes_the_device_channel(lab: Lab, logged: list) -> None:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    device = lab.connect((b"http", 0))
    lab.handler = lambda request: response(body=b"z" * (8 * 1024 * 1024))
    browser = lab.browser(get(b"big"), full=True)
    lab.flush()
    assert 0 < len(browser.body()) < 8 * 1024 * 1024
    browser.protocol.connectionLost(Failure(ConnectionLost()))
    lab.flush()
    tunnel = lab.hub.sessions.get("r1")
    assert tunnel is not None  # the node stays online
    (chan,) = device.conn.channels.values()
    assert chan.remoteClosed  # the hub closed its end of the channel
    assert [e for e in logged if e.get("log_failure") is not None] == []


def test_html_pages_keep_their_absolute_links_on_the_device(lab: Lab) -> None:
    page = (b'<html><a href="/status">s</a><form action=/cgi-bin/luci method=post>'
            b'<img src="//cdn.example/x.png"><a href="rel">r</a></form></html>')
    lab.connect((b"http", 0))
    lab.handler = lambda request: response(
        b"200 OK", (b"Content-Type: text/html; charset=utf-8",), page)
    browser = lab.browser(get())
    body = browser.body()
    assert body == (b'<html><a href="/nodes/r1/web/status">s</a>'
                    b'<form action=/nodes/r1/web/cgi-bin/luci method=post>'
                    b'<img src="//cdn.example/x.png"><a href="rel">r</a></form></html>')
    assert browser.header(b"content-length") == [b"%d" % len(body)]
    # Other types, and compressed HTML, pass as they came.
    for headers in ((b"Content-Type: text/css",),
                    (b"Content-Type: text/html", b"Content-Encoding: gzip")):
        lab.handler = lambda request, headers=headers: response(b"200 OK", headers, page)
        assert lab.browser(get()).body() == page


def test_a_page_too_big_to_rewrite_streams_unchanged(lab: Lab) -> None:
    from hub.rules.webproxy import HTML_REWRITE_MAX

    page = b'<a href="/x">' + b"." * HTML_REWRITE_MAX
    lab.connect((b"http", 0))
    lab.handler = lambda request: response(b"200 OK", (b"Content-Type: text/html",), page)
    assert lab.browser(get()).body() == page
