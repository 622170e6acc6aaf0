"""The web terminal end to end: a real hub (twistd) serving the terminal's resources, a real
device sshd calling home with `ssh -R`, and a WebSocket client playing the browser."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import define
from conftest import CALLHOME_PASSWORD
from helpers import LISTEN_RE, TWISTD, DeviceSSHD, HubProcess, make_key, wait_for
from tunnel_helpers import Device
from web_client import Rejected, WebTerminalClient

pytestmark = pytest.mark.e2e

TAC = Path(__file__).parent / "web_terminal_hub.tac"


class WebHub(HubProcess):
    """The hub of tests/web_terminal_hub.tac: `twistd callhomehub` plus the terminal's Site."""

    def start(self, ssh_endpoint: str = "tcp:0:interface=127.0.0.1") -> WebHub:
        self.data.mkdir(parents=True, exist_ok=True)
        args = ["--data", str(self.data), "--ssh", ssh_endpoint, "--keepalive", "2"]
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "-y", str(TAC)],
            env={**os.environ, "CALLHOMEHUB_ARGS": json.dumps(args)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"hub exited: {self.log_text()}")
            for what, _host, port in LISTEN_RE.findall(self.log_text()):
                self.ports[what] = int(port)
            return {"SSH", "web-terminal"} <= set(self.ports)

        wait_for(listening, 30, "the hub to listen")
        return self

    @property
    def web(self) -> int:
        return self.ports["web-terminal"]


@define
class Site:
    hub: WebHub
    sshd: DeviceSSHD
    device: Device


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """site-a (a real sshd that authorized the hub's management key) calling home;
    alice may reach site-*, bob only lab-*."""
    hub = WebHub(tmp_path / "hub")
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
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "site-*")
        hub.cli("user", "add", "bob", "--key", f"{alice}.pub", "--allow", "lab-*")
        yield Site(hub, sshd, device)
    finally:
        if device is not None:
            device.close()
        if sshd is not None:
            sshd.stop()
        hub.stop()


def audit(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("audit", "--json").stdout)


def test_a_shell_on_the_device_resize_and_exit_status(site: Site) -> None:
    term = WebTerminalClient(site.hub.web, "/as/alice/nodes/site-a/terminal/socket"
                                           "?cols=90&rows=20")
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
    entry = wait_for(lambda: [e for e in audit(site.hub) if e["action"] == "gateway"], 10,
                     "the audit record")[0]  # type: ignore[index]
    assert entry["actor"] == "alice@127.0.0.1" and entry["target"] == "site-a"
    assert entry["detail"].startswith("shell via web terminal start ")
    assert re.search(r"bytes to-device \d+ from-device \d+$", entry["detail"])
    assert "alice@127.0.0.1: shell on site-a via web terminal" in site.hub.log_text()


def test_a_denied_operator_gets_the_error_and_nothing_is_contacted(site: Site) -> None:
    logins = site.sshd.log.read_text().count("Accepted publickey")
    term = WebTerminalClient(site.hub.web, "/as/bob/nodes/site-a/terminal/socket")
    try:
        term.wait_closed()
    finally:
        term.close()
    assert term.control == [{"error": "node 'site-a' does not exist or you may not reach it"}]
    assert term.screen == b""
    assert site.sshd.log.read_text().count("Accepted publickey") == logins
    assert site.hub.log_text().count("bob@127.0.0.1: not granted node site-a") == 1


def test_a_cross_site_handshake_is_refused(site: Site) -> None:
    with pytest.raises(Rejected) as refused:
        WebTerminalClient(site.hub.web, "/as/alice/nodes/site-a/terminal/socket",
                          origin="https://evil.example")
    assert refused.value.status == 403
    assert b"cross-site WebSocket refused" in refused.value.body


def test_closing_the_tab_ends_the_device_session(site: Site) -> None:
    term = WebTerminalClient(site.hub.web, "/as/alice/nodes/site-a/terminal/socket")
    term.type(b"echo shell-$((0+$$))-pid\r")
    found = wait_for(lambda: term.pump(1) or re.search(rb"shell-(\d+)-pid", term.screen), 15,
                     "the shell's pid")
    assert isinstance(found, re.Match)
    shell = Path(f"/proc/{int(found.group(1))}")
    assert shell.exists()
    term.sock.close()  # the tab goes away without a close frame
    wait_for(lambda: not shell.exists(), 15, "the device's shell to end")
    wait_for(lambda: [e for e in audit(site.hub) if e["action"] == "gateway"], 10,
             "the audit record")


def test_the_page_and_its_scripts_are_served(site: Site) -> None:
    base = f"http://127.0.0.1:{site.hub.web}"
    with urllib.request.urlopen(f"{base}/as/alice/nodes/site-a/terminal") as page:
        html = page.read().decode()
        assert page.headers["content-security-policy"].startswith("default-src 'self';")
    for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        with urllib.request.urlopen(base + src) as static:
            assert static.status == 200 and static.read()
    assert '/static/vendor/xterm/xterm.js' in html


def test_a_message_too_large_to_gather_ends_the_session(site: Site) -> None:
    """Twisted gathers a whole message before handing it on: one that never ends is cut."""
    from wsproto.events import BytesMessage

    term = WebTerminalClient(site.hub.web, "/as/alice/nodes/site-a/terminal/socket")
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
    wait_for(lambda: "a message over 1048576 bytes, closing" in site.hub.log_text(), 10,
             "the log line")
