"""The device web UI proxy with the real pieces: a hub (`twistd callhomehub --web`), a device
calling home with the real `ssh -R http:0:localhost:PORT` to a real HTTP server on its side,
and HTTP clients signed in to the console on /nodes/NODE/web/."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from helpers import SSH, HubProcess, free_port, make_key, wait_for
from tunnel_helpers import rss_kib, wait_stalled
from twisted.conch.ssh import keys
from web_client import sign_in

from hub.rules.webproxy import SANDBOX_POLICY
from hub.store.registry import Registry

pytestmark = pytest.mark.e2e
HERE = Path(__file__).parent
PASSWORD = "alice-web-password"


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Rig:
    """Hub, device web server and the device's `ssh -R`, torn down by close(); alice
    (granted r1 only) signed in to the console, her browser's console cookies in `jar`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        data = tmp / "hub"
        data.mkdir()
        self.key = make_key(tmp / "device", "r1")
        registry = Registry(str(data / "hub.sqlite3"), now=time.time)
        blob = keys.Key.fromFile(f"{self.key}.pub").blob()
        registry.register("r1", blob, "fp", "test")
        registry.set_state("r1", "approved", "test")
        other = keys.Key.fromFile(f"{make_key(tmp / 'other', 'x')}.pub").blob()
        registry.register("secret", other, "fp2", "test")
        registry.set_state("secret", "approved", "test")
        registry.close()
        self.registry_path = data / "hub.sqlite3"
        self.hub = HubProcess(data, "--keepalive", "0", "--web", "tcp:0:interface=127.0.0.1")
        self.web: subprocess.Popen[bytes] | None = None
        self.device: subprocess.Popen[bytes] | None = None
        try:
            self.hub.cli("user", "add", "alice", "--password-stdin", "--allow", "r1",
                         stdin=f"{PASSWORD}\n".encode())
            self.hub.start()
            self.ssh_port, self.web_port = self.hub.port, self.hub.ports["web"]
            self.session = sign_in(self.web_port, "alice", PASSWORD)
            self.jar = dict([self.session.split("=", 1)])
            self.web = spawn(str(HERE / "device_web.py"))
            assert self.web.stdout is not None
            self.device_web_port = int(self.web.stdout.readline())
        except BaseException:
            self.close()
            raise

    @property
    def hub_pid(self) -> int:
        assert self.hub.proc is not None
        return self.hub.proc.pid

    def cookie(self) -> str:
        """The Cookie header alice's browser sends to /nodes/ paths."""
        return "; ".join(f"{name}={value}" for name, value in self.jar.items())

    def connect(self, target_port: int) -> None:
        self.device = subprocess.Popen(
            [SSH or "ssh", "-F", "/dev/null", "-N", "-p", str(self.ssh_port), "-i", str(self.key),
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ExitOnForwardFailure=yes",
             "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.tmp}/known",
             "-o", "LogLevel=ERROR", "-R", f"http:0:localhost:{target_port}", "cms@127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def forwarded() -> bool:
            assert self.device is not None and self.device.poll() is None, "ssh -R exited"
            registry = Registry(str(self.registry_path), now=time.time)
            try:
                node = registry.node("r1")
                return node.online and "http" in node.forwards
            finally:
                registry.close()

        wait_for(forwarded, 20, "the device's http forward")

    def disconnect(self) -> None:
        if self.device is not None:
            stop(self.device)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, list[str]], bytes]:
        """One request with alice's console cookies (before any `Cookie` in `headers`);
        the console's own Set-Cookies go into the jar, as a browser keeps them."""
        sent = dict(headers or {})
        sent["Cookie"] = "; ".join(filter(None, [self.cookie(), sent.get("Cookie")]))
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            found: dict[str, list[str]] = {}
            for name, value in response.getheaders():
                found.setdefault(name.lower(), []).append(value)
            got = response.status, found, response.read()
        finally:
            conn.close()
        for value in found.get("set-cookie", []):
            morsel = next(iter(SimpleCookie(value).values()))
            if morsel.key.startswith(("__Host-chh-", "__Secure-chh-")):
                self.jar[morsel.key] = morsel.value
        return got

    def close(self) -> None:
        self.disconnect()
        if self.web is not None:
            stop(self.web)
        self.hub.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def test_pages_redirects_cookies_and_errors_through_a_real_tunnel(rig: Rig) -> None:
    status, _, body = rig.request("GET", "/nodes/r1/web/")
    assert status == 503 and b"node r1 is offline" in body

    rig.connect(rig.device_web_port)
    status, headers, body = rig.request("GET", "/nodes/r1/web/")
    assert status == 200 and body == b"<html><body>device home</body></html>"
    # The sandbox is the page's one policy: the console's own (default-src 'self') would
    # also forbid the device's inline scripts and styles.
    assert headers["content-security-policy"] == [SANDBOX_POLICY.decode()], headers
    assert "x-frame-options" not in headers

    status, headers, _ = rig.request("GET", "/nodes/r1/web/redirect")
    assert status == 302 and headers["location"] == ["/nodes/r1/web/login"]
    status, headers, _ = rig.request("GET", "/nodes/r1/web/absolute")
    assert status == 302 and headers["location"] == ["/nodes/r1/web/login"]
    status, _, body = rig.request("GET", "/nodes/r1/web/login?x=1")
    assert (status, body) == (200, b"login page")

    status, headers, _ = rig.request("GET", "/nodes/r1/web/cookies")
    assert status == 200
    assert headers["set-cookie"] == ["sid=device-1; HttpOnly; Path=/nodes/r1/web/"]

    status, _, body = rig.request("GET", "/nodes/r1/web/echo?a=b", headers={
        "Cookie": "sid=device-1"})
    assert status == 200
    assert body.startswith(b"GET /echo?a=b HTTP/1.1")
    assert rig.cookie().count("chh-") == 2  # the console's session and browse cookies
    for secret in rig.jar.values():
        assert secret.encode() not in body
    assert b"Cookie: sid=device-1" in body
    assert b"X-Forwarded-Prefix: /nodes/r1/web" in body

    status, _, body = rig.request("POST", "/nodes/r1/web/form", body=b"a=1",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (status, body) == (200, b"got a=1")

    for path in ("/nodes/secret/web/", "/nodes/nosuch/web/"):
        status, _, body = rig.request("GET", path)
        assert status == 404 and b"There is no such node, or you may not see it." in body

    rig.disconnect()
    wait_for(lambda: rig.request("GET", "/nodes/r1/web/")[0] == 503, 20, "the node offline")

    rig.connect(free_port())  # nothing listens there on the device
    status, _, body = rig.request("GET", "/nodes/r1/web/")
    assert status == 502 and b"refused the connection" in body

    registry = Registry(str(rig.registry_path), now=time.time)
    browses = [e for e in registry.audit_log() if e.action == "browse"]
    registry.close()
    assert [(e.actor, e.target) for e in browses] == [("alice@127.0.0.1", "r1")]


def test_a_big_download_to_a_reader_that_stops_keeps_the_hub_small(rig: Rig) -> None:
    size = 200 * 1024 * 1024
    rig.connect(rig.device_web_port)
    assert rig.request("GET", "/nodes/r1/web/")[0] == 200
    before = rss_kib(rig.hub_pid)
    sock = socket.create_connection(("127.0.0.1", rig.web_port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /nodes/r1/web/big?n=%d HTTP/1.1\r\nHost: hub\r\nCookie: %s\r\n"
                 b"Connection: close\r\n\r\n" % (size, rig.cookie().encode()))
    got = [0]
    gate = threading.Event()

    def read() -> None:
        sock.recv(64 * 1024)  # the head and a little of the body, then stop
        gate.wait(120)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            got[0] += len(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Wait until the hub stops taking data from the device (its RSS settles).
    wait_stalled(lambda: rss_kib(rig.hub_pid) // 1024, quiet=2.0, timeout=60)
    grown = rss_kib(rig.hub_pid) - before
    gate.set()
    reader.join(120)
    sock.close()
    assert got[0] >= size - 64 * 1024
    # 200 MiB went through; the hub held at most a few windows and socket buffers.
    assert grown < 32 * 1024, f"hub RSS grew {grown} KiB while the reader was stopped"
    assert os.path.exists(f"/proc/{rig.hub_pid}")
