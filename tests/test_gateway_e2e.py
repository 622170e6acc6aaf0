"""The console gateway and jump host with the real ssh client and a real sshd device."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import define
from helpers import DeviceSSHD, HubProcess, SSHClient, make_key, wait_for
from tunnel_helpers import Device, Listener, node, rss_kib, wait_stalled

from hub.store.registry import Registry

pytestmark = pytest.mark.e2e


@define
class Site:
    hub: HubProcess
    sshd: DeviceSSHD
    device: Device
    operator: SSHClient
    alice: Path
    web: Listener


@pytest.fixture
def site(hub: HubProcess, tmp_path: Path) -> Iterator[Site]:
    """site-a: a device sshd that authorized the hub's management key and alice's key,
    calling home with its ssh and http services; alice may reach site-*."""
    alice = make_key(tmp_path / "alice", "alice")
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    sshd = DeviceSSHD(tmp_path / "sshd", [mgmt, alice]).start()
    web = Listener(lambda conn: (conn.recv(100), conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nweb"),
                                 conn.close()))
    device = Device(hub, tmp_path, "site-a")
    try:  # a set-up that times out still stops the device's sshd and listener
        device.connect(f"0:127.0.0.1:{sshd.port}", f"80:127.0.0.1:{web.port}")
        approved = hub.cli("approve", "site-a")
        assert b"host key" in approved.stdout and b"pinned" in approved.stdout
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "site-*")
        operator = SSHClient(tmp_path / "operator", hub.port)
        yield Site(hub, sshd, device, operator, alice, web)
    finally:
        device.close()
        sshd.stop()
        web.close()


def audit(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("audit", "--json").stdout)


def test_exec_passes_output_stderr_and_exit_status(site: Site) -> None:
    result = site.operator.run("alice:site-a@127.0.0.1", "echo out; echo err >&2; exit 3",
                               key=site.alice)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    # Node names are case-insensitive.
    upper = site.operator.run("alice:SITE-A@127.0.0.1", "echo ok", key=site.alice)
    assert (upper.returncode, upper.stdout) == (0, b"ok\n")
    [entry, *_] = [e for e in audit(site.hub) if e["action"] == "gateway"]
    assert entry["actor"] == "alice@127.0.0.1" and entry["target"] == "site-a"
    assert entry["detail"].startswith("exec start ") and "from-device 8" in entry["detail"]


def test_refusals_never_contact_the_device(site: Site, tmp_path: Path) -> None:
    site.hub.cli("user", "add", "bob", "--key", f"{site.alice}.pub", "--allow", "lab-*",
                 check=False)
    bob_key = make_key(tmp_path / "bob", "bob")
    site.hub.cli("user", "del", "bob")
    site.hub.cli("user", "add", "bob", "--key", f"{bob_key}.pub", "--allow", "lab-*")
    logins_before = site.sshd.log.read_text().count("Accepted publickey")
    denied = site.operator.run("bob:site-a@127.0.0.1", "true", key=bob_key)
    assert denied.returncode == 1
    assert b"node 'site-a' does not exist or you may not reach it" in denied.stderr
    unknown = site.operator.run("alice:nosuch@127.0.0.1", "true", key=site.alice)
    assert b"node 'nosuch' does not exist or you may not reach it" in unknown.stderr
    jump = site.operator.run("bob@127.0.0.1", key=bob_key, options=[
        "-o", "LogLevel=INFO", "-W", "site-a:22"])
    assert jump.returncode == 255
    assert b"administratively prohibited" in jump.stderr
    assert b"does not exist or you may not reach it" in jump.stderr
    no_port = site.operator.run("alice@127.0.0.1", key=site.alice, options=[
        "-o", "LogLevel=INFO", "-W", "site-a:8443"])
    assert b"node site-a does not forward port 8443" in no_port.stderr
    assert site.sshd.log.read_text().count("Accepted publickey") == logins_before

    site.device.close()
    wait_for(lambda: not node(site.hub, "site-a")["online"], 10, "site-a offline")
    offline = site.operator.run("alice:site-a@127.0.0.1", "true", key=site.alice)
    assert offline.returncode == 1 and b"node site-a is offline" in offline.stderr


def test_jump_host_and_forwards_by_node_name(site: Site, tmp_path: Path) -> None:
    device_known = tmp_path / "device_known_hosts"
    device_known.write_text(f"site-a {Path(f'{site.sshd.host_key}.pub').read_text()}")
    # One ssh_config for both hops: `ssh -J` passes `-F` on to the jump process.
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host 127.0.0.1\n  UserKnownHostsFile {site.operator.known_hosts}\n"
        "  StrictHostKeyChecking accept-new\n"
        f"Host site-a SITE-A\n  UserKnownHostsFile {device_known}\n"
        "  StrictHostKeyChecking yes\n"
        f"Host *\n  BatchMode yes\n  IdentitiesOnly yes\n  IdentityFile {site.alice}\n")
    for target in ("root@site-a", "root@SITE-A"):
        # End to end to the device's own sshd, whose host key the operator's client
        # checks itself: the hub only relays. Node names are case-insensitive.
        result = subprocess.run(
            ["ssh", "-F", str(config), "-J", f"alice@127.0.0.1:{site.hub.port}", target,
             "echo end-to-end"], capture_output=True, timeout=30)
        assert (result.returncode, result.stdout) == (0, b"end-to-end\n"), result.stderr
    stdio = subprocess.run(
        ["ssh", "-F", str(config), "-p", str(site.hub.port), "-W", "site-a:22",
         "alice@127.0.0.1"], input=b"", capture_output=True, timeout=30)
    assert stdio.stdout.startswith(b"SSH-2.0-OpenSSH"), stdio.stderr

    local = socket.socket()
    local.bind(("127.0.0.1", 0))
    port = local.getsockname()[1]
    local.close()
    forward = site.operator.popen("alice@127.0.0.1", key=site.alice, options=[
        "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{port}:site-a:80"])
    try:
        def fetch() -> bytes:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    return s.makefile("rb").read()
            except OSError:
                return b""
        assert wait_for(fetch, 15, "the -L forward") == b"HTTP/1.0 200 OK\r\n\r\nweb"
    finally:
        forward.terminate()
        forward.wait(10)
    assert {"jump"} <= {e["action"] for e in audit(site.hub)}


class Terminal:
    """`ssh -tt` driven through pipes: write keys, wait for screen text."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 15.0) -> bytes:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {text!r}; screen: {self.seen[-500:]!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"EOF before {text!r}; screen: {self.seen[-500:]!r}")
                self.seen += chunk
        found = self.seen
        self.seen = self.seen[self.seen.index(text) + len(text):]
        return found

    def type(self, keys: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(keys)
        self.proc.stdin.flush()


def test_chooser_pty_shell_and_back(site: Site) -> None:
    base = site.operator.base(key=site.alice)
    proc = subprocess.Popen([base[0], "-tt", *base[1:], "alice@127.0.0.1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=site.operator.env(None))
    term = Terminal(proc)
    try:
        screen = term.expect(b"Connect to node > ")
        assert b"1: site-a (online)" in screen and b"q: quit" in screen
        term.type(b"nosuch\r")
        term.expect(b"No such node: nosuch")
        term.type(b"1\r")
        term.expect(b"#")  # the device's root shell prompt
        term.type(b"echo $((6*7)); stty size\r")
        term.expect(b"42")
        term.type(b"exit\r")
        term.expect(b"Connection to site-a closed.")
        term.expect(b"Connect to node > ")
        term.type(b"site-a\r")
        term.expect(b"#")
        term.type(b"exit\r")
        term.expect(b"Connect to node > ")
        term.type(b"q\r")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kinds = [e["detail"].split(" ")[0] for e in audit(site.hub) if e["action"] == "gateway"]
    assert kinds == ["shell", "shell"]


def test_console_port_template(site: Site) -> None:
    site.hub.cli("console-template", "site-a", "echo console {port}")
    result = site.operator.run("alice:site-a:port02@127.0.0.1", key=site.alice,
                               options=["-tt"])
    assert result.returncode == 0
    assert b"console port02" in result.stdout


def test_changed_device_host_key_is_refused(site: Site, tmp_path: Path) -> None:
    site.sshd.stop()
    new_key = make_key(tmp_path / "new_host_key", "new")
    config = site.sshd.config.read_text().replace(str(site.sshd.host_key), str(new_key))
    site.sshd.config.write_text(config)
    site.sshd.start()
    result = site.operator.run("alice:site-a@127.0.0.1", "true", key=site.alice)
    assert result.returncode == 1
    assert b"device host key changed" in result.stderr
    assert "device host key changed" in site.hub.log_text()


def test_bulk_output_through_the_gateway_is_flow_controlled(site: Site) -> None:
    total = 100 * 1024 * 1024
    base = site.operator.base(key=site.alice)
    proc = subprocess.Popen([base[0], *base[1:], "alice:site-a@127.0.0.1",
                             f"head -c {total} /dev/zero"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=site.operator.env(None))
    pid = site.hub.proc.pid  # type: ignore[union-attr]
    before = rss_kib(pid)
    try:
        # Nobody reads ssh's stdout yet: everything must stall, not pile up in the hub.
        wait_stalled(lambda: site.device.proc is not None and rss_kib(pid), quiet=2.0)
        grown = rss_kib(pid) - before
        assert grown < 32 * 1024, f"hub RSS grew by {grown} KiB"
        received = 0
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            received += len(chunk)
        assert proc.wait(60) == 0
        assert received == total
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_deleting_an_operator_ends_their_session_and_jump_within_2s(site: Site) -> None:
    # The hub's own logins (approve's check) are in the device's log already.
    logins = site.sshd.log.read_text().count("Accepted publickey")
    session = site.operator.popen("alice:site-a@127.0.0.1", "sleep 60", key=site.alice,
                                  options=["-o", "LogLevel=INFO"])
    base = site.operator.base(key=site.alice)
    # -W with its stdin kept open, as when it carries another ssh's connection.
    stdio = subprocess.Popen([base[0], "-o", "LogLevel=INFO", *base[1:], "-W", "site-a:22",
                              "alice@127.0.0.1"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert stdio.stdout is not None
        assert stdio.stdout.readline().startswith(b"SSH-2.0-OpenSSH")
        wait_for(lambda: site.sshd.log.read_text().count("Accepted publickey") > logins, 15,
                 "the session's login to the device")
        # What `callhomehub user del alice` does, from here: the 2 s are the hub's, and a
        # CLI process can take longer than that to start on a loaded machine.
        registry = Registry(str(site.hub.data / "hub.sqlite3"), now=time.time)
        started = time.monotonic()
        registry.del_user("alice", "test")
        registry.close()
        session.wait(5)
        stdio.wait(5)
        took = time.monotonic() - started
    finally:
        for proc in (session, stdio):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert stdio.stdin is not None
        stdio.stdin.close()
    assert took <= 2.0, f"the operator's connections ended {took:.2f} s after user del"
    assert session.returncode == 255
    for proc in (session, stdio):
        assert proc.stderr is not None
        assert b"operator alice was deleted on the hub" in proc.stderr.read()


def test_a_device_that_offers_only_chacha20_is_reached_too(hub: HubProcess,
                                                           tmp_path: Path) -> None:
    """The hub's sessions to devices put AES-GCM first where the CPU has AES; a device
    without it (or an older sshd) is still reached with what it offers."""
    alice = make_key(tmp_path / "alice", "alice")
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    sshd = DeviceSSHD(tmp_path / "sshd", [mgmt, alice],
                      extra_config="Ciphers chacha20-poly1305@openssh.com\n").start()
    device = Device(hub, tmp_path, "site-c")
    try:
        device.connect(f"0:127.0.0.1:{sshd.port}")
        assert b"pinned" in hub.cli("approve", "site-c").stdout
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "site-*")
        operator = SSHClient(tmp_path / "operator", hub.port)
        result = operator.run("alice:site-c@127.0.0.1", "echo through", key=alice)
        assert (result.returncode, result.stdout) == (0, b"through\n"), result.stderr
    finally:
        device.close()
        sshd.stop()
