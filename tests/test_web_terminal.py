"""The web terminal in memory: its WebSocket protocol driving a session on the in-memory
device of `memory_gateway.Site`, its page, its Origin check and control messages."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from memory_gateway import Site, audit
from twisted.conch.ssh.common import NS, getNS
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from hub.access.reach import OperatorReach
from hub.rules.logins import OperatorLogin
from hub.ssh.channels import WINDOW
from hub.web.terminal import TerminalPage, TerminalSocket, origin_refusal, terminal_resource
from hub.web.terminal_session import (
    ControlError,
    WebTerminal,
    parse_control,
    pty_request,
)


class TCPTransport(StringTransport):
    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class FakeRequest:
    """What WebTerminal uses of the HTTP request it was upgraded from."""

    def __init__(self) -> None:
        self.transport = TCPTransport()
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer


class Browser:
    """The WebSocket transport as the browser sees it: what the hub sent."""

    def __init__(self, site: Site, terminal: WebTerminal) -> None:
        self.site = site
        self.terminal = terminal
        self.output = b""
        self.control: list[dict[str, Any]] = []
        self.closed = False
        terminal.negotiationStarted(self)  # type: ignore[arg-type]
        terminal.negotiationFinished()
        site.settle()

    def sendBytesMessage(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.output += data

    def sendTextMessage(self, text: str) -> None:
        self.control.append(json.loads(text))

    def loseConnection(self, code: int = 1000) -> None:
        self.closed = True
        self.site.clock.callLater(0, self.terminal.connectionLost, None)

    def type(self, data: bytes) -> None:
        self.terminal.bytesMessageReceived(data)
        self.site.settle()

    def say(self, message: str) -> None:
        self.terminal.textMessageReceived(message)
        self.site.settle()

    def close_tab(self) -> None:
        self.terminal.connectionLost(None)  # type: ignore[arg-type]
        self.site.settle()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def reach(site: Site, user: str = "alice") -> OperatorReach:
    return OperatorReach(site.hub.gateway_needs(), OperatorLogin(user), lambda: "192.0.2.30")


def open_terminal(site: Site, node: str = "site-a", user: str = "alice",
                  size: tuple[int, int] = (100, 30)) -> Browser:
    request = FakeRequest()
    terminal = WebTerminal(reach(site, user), node, size, request)  # type: ignore[arg-type]
    browser = Browser(site, terminal)
    assert request.producer is terminal
    return browser


def pty_of(data: bytes) -> tuple[bytes, int, int]:
    term, rest = getNS(data)
    cols, rows = struct.unpack(">2L", rest[:8])
    return term, cols, rows


def messages(logged: list[LogEvent], text: str) -> list[str]:
    return [m for m in (formatEvent(e) for e in logged) if text in m]


def test_a_shell_with_a_pty_of_the_browsers_size_and_its_exit(site: Site) -> None:
    browser = open_terminal(site)
    assert site.sshd.logins == [b"root"]
    [shell] = site.sshd.sessions
    assert shell.command == b"shell"
    assert shell.pty is not None and pty_of(shell.pty) == (b"xterm-256color", 100, 30)
    assert browser.output == b"root# "
    browser.type(b"echo hello\r")
    assert browser.output.endswith(b"ran echo hello\r\nroot# ")
    browser.type(b"exit\r")
    assert browser.control == [{"exit": 0}]
    assert browser.closed
    site.settle()
    [(action, node, detail)] = audit(site.hub)
    assert (action, node) == ("gateway", "site-a")
    assert detail.startswith("shell via web terminal start ")
    assert detail.endswith(" bytes to-device 16 from-device 40")


def test_resize_before_and_while_relaying(site: Site) -> None:
    request = FakeRequest()
    terminal = WebTerminal(reach(site), "site-a", (80, 24), request)  # type: ignore[arg-type]
    terminal.negotiationStarted(Browser.__new__(Browser))  # type: ignore[arg-type]
    # A resize while the device is being reached changes the pty it will get.
    terminal.textMessageReceived('{"resize": [120, 40]}')
    browser = Browser(site, terminal)
    [shell] = site.sshd.sessions
    assert shell.pty is not None and pty_of(shell.pty)[1:] == (120, 40)
    browser.say(json.dumps({"resize": [132, 43]}))
    assert shell.window_changes == [struct.pack(">4L", 132, 43, 0, 0)]
    assert browser.control == [] and not browser.closed


def test_closing_the_tab_closes_the_device_channel_and_connection(site: Site) -> None:
    browser = open_terminal(site)
    [shell] = site.sshd.sessions
    terminal = browser.terminal
    tunnel_channels = site.tunnel.service.channels  # the device's side of its tunnel
    assert len(tunnel_channels) == 1  # the hub's login to the device rides on one
    browser.close_tab()
    assert shell.closing  # the device's session channel was closed
    assert terminal.device_conn is None and terminal.relay_peer is None
    assert tunnel_channels == {}  # and the login's tunnel channel with it
    [(_, _, detail)] = audit(site.hub)
    assert "via web terminal" in detail


def test_refusals_reach_the_browser_and_the_log_once(site: Site,
                                                     logged: list[LogEvent]) -> None:
    site.hub.registry.add_user("bob", None, [], ["lab-*"], "test")
    denied = open_terminal(site, user="bob")
    assert denied.control == [{"error": "node 'site-a' does not exist or you may not reach it"}]
    assert denied.closed
    unknown = open_terminal(site, node="nosuch")
    assert unknown.control == [{"error": "node 'nosuch' does not exist or you may not reach it"}]
    site.enroll("site-b", site.sshd)
    offline = open_terminal(site, node="site-b")
    assert offline.control == [{"error": "node site-b is offline"}]
    assert site.sshd.logins == []  # nothing was contacted
    assert len(messages(logged, "not granted node site-a")) == 1
    assert messages(logged, "site-a does not exist") == []  # the note says it already
    assert len(messages(logged, "bob@192.0.2.30")) == 1
    assert len(messages(logged, "site-b is offline")) == 1
    assert audit(site.hub) == []


def test_a_failed_device_login_is_an_error_logged_once(site: Site,
                                                       logged: list[LogEvent]) -> None:
    site.hub.registry.set_device_access("site-a", "test", host_key=site.alice.public().blob())
    browser = open_terminal(site)
    [error] = browser.control
    assert error["error"].startswith("cannot log in to site-a: device host key changed")
    assert browser.closed
    assert len(messages(logged, "cannot reach site-a: device host key changed")) == 1
    assert messages(logged, "web terminal on site-a") == []


def test_losing_the_grant_or_the_operator_ends_the_session(site: Site) -> None:
    browser = open_terminal(site)
    other = open_terminal(site)
    assert len(site.hub.operators) == 2
    site.hub.registry.set_user("alice", "test", allow=["lab-*"])
    site.hub.operators.enforce()  # as the registry poll does
    site.settle()
    for b in (browser, other):
        assert b.control == [{"error": "access to node site-a was withdrawn"}]
        assert b.closed
    site.settle()
    assert len(site.hub.operators) == 0
    assert len(audit(site.hub)) == 2
    site.hub.registry.set_user("alice", "test", allow=["site-*"])
    third = open_terminal(site)
    site.hub.registry.del_user("alice", "test")
    site.hub.operators.enforce()  # as the registry poll does
    site.settle()
    assert third.control == [{"error": "operator alice was deleted on the hub"}]
    assert third.closed


def test_a_flooding_device_waits_for_the_browser(site: Site) -> None:
    browser = open_terminal(site)
    [shell] = site.sshd.sessions
    terminal = browser.terminal
    terminal.pauseProducing()  # the browser's connection stopped taking data
    before = len(browser.output)
    flood = b"x" * (4 * WINDOW)
    shell.write(flood)
    site.settle()
    held = len(browser.output) - before
    assert 0 < held <= WINDOW  # at most one window, then the device waits
    assert len(shell.buf) >= len(flood) - WINDOW
    terminal.resumeProducing()
    site.settle()
    for _ in range(20):
        if len(browser.output) - before == len(flood):
            break
        terminal.pauseProducing()
        terminal.resumeProducing()
        site.settle()
    assert browser.output[before:] == flood


def test_keystrokes_are_not_held_by_nagle(site: Site) -> None:
    browser = open_terminal(site)
    assert browser.terminal._request.transport.no_delay  # type: ignore[attr-defined]


def test_input_waits_while_the_devices_window_is_full(site: Site) -> None:
    browser = open_terminal(site)
    device = browser.terminal.relay_peer
    request = browser.terminal._request  # type: ignore[attr-defined]
    device.stopWriting()  # as Conch does when the device's window is used up
    assert request.transport.producerState == "paused"
    device.startWriting()
    assert request.transport.producerState == "producing"


def test_bad_control_messages_end_the_session_with_a_clear_error(
        site: Site, logged: list[LogEvent]) -> None:
    browser = open_terminal(site)
    browser.say('{"resize": [0, 24]}')
    assert browser.control == [
        {"error": "bad control message: a terminal size is two whole numbers from 1 to 1000"}]
    assert browser.closed
    assert len(messages(logged, "bad control message")) == 1


@pytest.mark.parametrize("message", [
    "not json", "[]", '{"resize": [80]}', '{"resize": [80, 24], "x": 1}',
    '{"resize": ["80", 24]}', '{"resize": [true, 24]}', '{"resize": [80, 100000]}',
])
def test_control_messages_are_checked(message: str) -> None:
    with pytest.raises(ControlError):
        parse_control(message)


def test_a_resize_message() -> None:
    assert parse_control('{"resize": [132, 43]}') == (132, 43)
    assert pty_request(80, 24) == NS(b"xterm-256color") + struct.pack(">4L", 80, 24, 0, 0) + NS(
        b"")


def rendered(page: Any, request: DummyRequest) -> bytes:
    """The page's answer, written once the grants were read (inline here)."""
    assert page.render_GET(request) == NOT_DONE_YET
    assert request.finished
    return b"".join(request.written)


def request_with(headers: dict[bytes, bytes], args: dict[bytes, list[bytes]] | None = None
                 ) -> DummyRequest:
    request = DummyRequest([])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    request.args = args or {}
    return request


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    (b"https://hub.example", b"hub.example", True),
    (b"https://hub.example", b"hub.example:443", True),
    (b"https://HUB.example:8443", b"hub.example:8443", True),
    (b"http://127.0.0.1:8080", b"127.0.0.1:8080", True),
    (b"https://evil.example", b"hub.example", False),
    (b"https://hub.example:444", b"hub.example", False),
    (b"https://hub.example.evil.example", b"hub.example", False),
    (b"null", b"hub.example", False),
    (b"file://hub.example", b"hub.example", False),
    (b"https://hub.example:99999", b"hub.example", False),
])
def test_origin_must_be_the_console_itself(origin: bytes, host: bytes, allowed: bool) -> None:
    why = origin_refusal(request_with({b"origin": origin, b"host": host}))
    assert (why is None) is allowed, why


def test_a_handshake_without_origin_is_refused() -> None:
    assert origin_refusal(request_with({b"host": b"hub"})) == "no Origin header"


def test_a_cross_site_socket_is_refused_before_anything_runs(
        site: Site, logged: list[LogEvent]) -> None:
    socket = TerminalSocket(reach(site), "site-a")
    request = request_with({b"origin": b"https://evil.example", b"host": b"hub.example",
                            b"upgrade": b"websocket", b"connection": b"Upgrade"})
    body = socket.render_GET(request)
    assert request.responseCode == 403 and body == b"cross-site WebSocket refused\n"
    assert site.sshd.logins == []
    assert len(messages(logged, "is not this site")) == 1


def test_the_page_loads_xterm_and_our_script_without_inline_script(site: Site) -> None:
    page = terminal_resource(reach(site), "SITE-A")
    assert isinstance(page, TerminalPage)
    request = request_with({})
    html = rendered(page, request).decode()
    assert "<title>site-a — callhomehub terminal</title>" in html
    scripts = ['<script src="/static/vendor/xterm/xterm.js" defer></script>',
               '<script src="/static/vendor/xterm/addon-fit.js" defer></script>',
               '<script src="/static/terminal.js" defer></script>']
    positions = [html.index(s) for s in scripts]
    assert positions == sorted(positions)  # xterm.js, its addon, then ours
    assert html.count("<script") == 3 and "<script>" not in html and "onload" not in html
    assert 'href="/static/vendor/xterm/xterm.css"' in html
    assert 'data-socket="/nodes/site-a/terminal/socket"' in html
    csp = request.responseHeaders.getRawHeaders(b"content-security-policy")[0]
    assert csp.startswith(b"default-src 'self';") and b"script-src" not in csp
    assert isinstance(page.getChild(b"socket", request_with({})), TerminalSocket)


def test_the_page_of_a_node_not_granted_is_not_found(site: Site) -> None:
    site.hub.registry.add_user("bob", None, [], ["lab-*"], "test")
    request = request_with({})
    body = rendered(terminal_resource(reach(site, "bob"), "site-a"), request)
    assert request.responseCode == 404
    assert body == b"node 'site-a' does not exist or you may not reach it\n"


def test_static_files_are_ours_and_name_no_cdn() -> None:
    static = Path(__file__).parent.parent / "hub" / "web" / "static"
    script = (static / "terminal.js").read_text()
    assert "new Terminal(" in script and "new FitAddon.FitAddon()" in script
    assert "http://" not in script and "https://" not in script
    assert "binaryType = \"arraybuffer\"" in script
