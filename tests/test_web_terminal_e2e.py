"""The web terminal end to end: a real hub (`twistd callhomehub --web`), operators signed in
over HTTP, a real device sshd calling home with `ssh -R`, and a WebSocket client playing the
browser on /nodes/NODE/terminal/socket."""

from __future__ import annotations

import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import define
from conftest import CALLHOME_PASSWORD
from helpers import DeviceSSHD, HubProcess, make_key, wait_for
from tunnel_helpers import Device
from web_client import Rejected, WebTerminalClient, sign_in

pytestmark = pytest.mark.e2e

SOCKET = "/nodes/site-a/terminal/socket"


@define
class Site:
    hub: HubProcess
    sshd: DeviceSSHD
    device: Device
    alice: str  # the Cookie header of alice's console session
    bob: str

    @property
    def web(self) -> int:
        return self.hub.ports["web"]

    def terminal(self, cookie: str | None, path: str = SOCKET, origin: str | None = None
                 ) -> WebTerminalClient:
        return WebTerminalClient(self.web, path, origin=origin, cookie=cookie)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """site-a (a real sshd that authorized the hub's management key) calling home;
    alice may reach site-*, bob only lab-*; both signed in with a password.
    One for the module: setting it up costs seconds of bcrypt and process starts, and
    no test changes it (each looks only at the audit records and log lines it causes)."""
    tmp_path = tmp_path_factory.mktemp("web-terminal")
    hub = HubProcess(tmp_path / "hub", "--keepalive", "2", "--web", "tcp:0:interface=127.0.0.1")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    sshd = None
    device = None
    try:
        sshd = DeviceSSHD(tmp_path / "sshd", [hub.data / "keys" / "hub_mgmt_ed25519_key.pub"]
                          ).start()
        device = Device(hub, tmp_path, "site-a")
        device.connect(f"0:127.0.0.1:{sshd.port}")
        assert b"pinned" in hub.cli("approve", "site-a").stdout
        alice = make_key(tmp_path / "alice", "alice")
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--password-stdin",
                "--allow", "site-*", stdin=b"alice-web-password\n")
        hub.cli("user", "add", "bob", "--password-stdin", "--allow", "lab-*",
                stdin=b"bob-web-password\n")
        port = hub.ports["web"]
        yield Site(hub, sshd, device, sign_in(port, "alice", "alice-web-password"),
                   sign_in(port, "bob", "bob-web-password"))
    finally:
        if device is not None:
            device.close()
        if sshd is not None:
            sshd.stop()
        hub.stop()


def audit(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("audit", "--json").stdout)


def gateway_records(hub: HubProcess, before: int = 0) -> list[dict]:
    """The gateway audit records after the first `before` ones."""
    return [e for e in audit(hub) if e["action"] == "gateway"][before:]


def test_a_shell_on_the_device_resize_and_exit_status(site: Site) -> None:
    before, log = len(gateway_records(site.hub)), len(site.hub.log_text())
    term = site.terminal(site.alice, f"{SOCKET}?cols=90&rows=20")
    try:
        term.type(b"echo hel''lo; tty\r")
        term.expect(b"hello\r\n")
        assert re.match(rb"/dev/pts/\d+\r\n", term.expect(b"\r\n"))
        term.type(b"stty size\r")
        term.expect(b"20 90\r\n")
        term.say({"resize": [100, 33]})
        term.type(b"stty size\r")
        term.expect(b"33 100\r\n")
        term.type(b"echo $TERM; exit 3\r")
        term.expect(b"xterm-256color\r\n")
        term.wait_closed()
        assert term.control == [{"exit": 3}]
    finally:
        term.close()
    entry = wait_for(lambda: gateway_records(site.hub, before), 10,
                     "the audit record")[0]  # type: ignore[index]
    assert entry["actor"] == "alice@127.0.0.1" and entry["target"] == "site-a"
    assert entry["detail"].startswith("shell via web terminal start ")
    assert re.search(r"bytes to-device \d+ from-device \d+$", entry["detail"])
    assert "alice@127.0.0.1: shell on site-a via web terminal" in site.hub.log_text()[log:]


def test_a_denied_operator_gets_the_error_and_nothing_is_contacted(site: Site) -> None:
    """The console's router refuses a node outside the operator's grants before the
    terminal's WebSocket is opened: the same page as for a node that does not exist."""
    logins = site.sshd.log.read_text().count("Accepted publickey")
    before, log = len(gateway_records(site.hub)), len(site.hub.log_text())
    with pytest.raises(Rejected) as refused:
        site.terminal(site.bob)
    assert refused.value.status == 404
    assert b"There is no such node, or you may not see it." in refused.value.body
    assert site.sshd.log.read_text().count("Accepted publickey") == logins
    assert "bob@127.0.0.1: shell on site-a" not in site.hub.log_text()[log:]
    assert not gateway_records(site.hub, before)
    with pytest.raises(Rejected) as unsigned:
        site.terminal(None)
    assert unsigned.value.status == 401


def test_a_cross_site_handshake_is_refused(site: Site) -> None:
    with pytest.raises(Rejected) as refused:
        site.terminal(site.alice, origin="https://evil.example")
    assert refused.value.status == 403
    assert b"cross-site WebSocket refused" in refused.value.body


def test_closing_the_tab_ends_the_device_session(site: Site) -> None:
    before = len(gateway_records(site.hub))
    term = site.terminal(site.alice)
    term.type(b"echo shell-$((0+$$))-pid\r")
    found = wait_for(lambda: term.pump(1) or re.search(rb"shell-(\d+)-pid", term.screen), 15,
                     "the shell's pid")
    assert isinstance(found, re.Match)
    shell = Path(f"/proc/{int(found.group(1))}")
    assert shell.exists()
    term.sock.close()  # the tab goes away without a close frame
    wait_for(lambda: not shell.exists(), 15, "the device's shell to end")
    wait_for(lambda: gateway_records(site.hub, before), 10, "the audit record")


def test_the_page_and_its_scripts_are_served(site: Site) -> None:
    base = f"http://127.0.0.1:{site.web}"
    request = urllib.request.Request(f"{base}/nodes/site-a/terminal",
                                     headers={"Cookie": site.alice})
    with urllib.request.urlopen(request) as page:
        html = page.read().decode()
        assert page.headers["content-security-policy"].startswith("default-src 'self';")
    for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        with urllib.request.urlopen(base + src) as static:
            assert static.status == 200 and static.read()
    assert '/static/vendor/xterm/xterm.js' in html


def test_a_message_too_large_to_gather_ends_the_session(site: Site) -> None:
    """Twisted gathers a whole message before handing it on: one that never ends is cut."""
    from wsproto.events import BytesMessage

    log = len(site.hub.log_text())
    term = site.terminal(site.alice)
    try:
        term.type(b"echo ready\r")
        term.expect(b"ready\r\n")
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):  # the hub may reset the connection meanwhile
            for _ in range(64):  # 4 MiB, never finished
                term.sock.sendall(term.ws.send(BytesMessage(chunk, message_finished=False)))
        term.sock.settimeout(15)
        try:
            while term.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass  # the hub aborted the connection: what is expected
    finally:
        term.close()
    wait_for(lambda: "a message over 1048576 bytes, closing" in site.hub.log_text()[log:], 10,
             "the log line")
