"""The device web UI proxy with the real pieces: a hub process, a device calling home
with the real `ssh -R http:0:localhost:PORT` to a real HTTP server on its side, and
HTTP clients against the proxy's Site (tests/web_proxy_hub.py)."""

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
from pathlib import Path

import pytest
from helpers import SSH, free_port, make_key, wait_for
from tunnel_helpers import rss_kib, wait_stalled
from twisted.conch.ssh import keys

from hub.store.registry import Registry

pytestmark = pytest.mark.e2e
HERE = Path(__file__).parent


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
    """Hub, device web server and the device's `ssh -R`, torn down by close()."""

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
        registry.add_user("alice", None, [], ["r1"], "test")
        registry.close()
        self.registry_path = data / "hub.sqlite3"
        self.hub = spawn(str(HERE / "web_proxy_hub.py"), str(data), "alice")
        assert self.hub.stdout is not None
        ports = dict(self.hub.stdout.readline().decode().split() for _ in range(2))
        self.ssh_port, self.web_port = int(ports["ssh"]), int(ports["web"])
        self.web = spawn(str(HERE / "device_web.py"))
        assert self.web.stdout is not None
        self.device_web_port = int(self.web.stdout.readline())
        self.device: subprocess.Popen[bytes] | None = None

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
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            found: dict[str, list[str]] = {}
            for name, value in response.getheaders():
                found.setdefault(name.lower(), []).append(value)
            return response.status, found, response.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.disconnect()
        stop(self.web)
        stop(self.hub)


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
    assert headers["content-security-policy"][0].startswith("sandbox allow-scripts")

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
        "Cookie": "sid=device-1; __Host-chh-session=CONSOLE-SECRET"})
    assert status == 200
    assert body.startswith(b"GET /echo?a=b HTTP/1.1")
    assert b"CONSOLE-SECRET" not in body and b"Cookie: sid=device-1" in body
    assert b"X-Forwarded-Prefix: /nodes/r1/web" in body

    status, _, body = rig.request("POST", "/nodes/r1/web/form", body=b"a=1",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (status, body) == (200, b"got a=1")

    for path in ("/nodes/secret/web/", "/nodes/nosuch/web/"):
        status, _, body = rig.request("GET", path)
        assert status == 404 and b"does not exist or you may not reach it" in body

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
    before = rss_kib(rig.hub.pid)
    sock = socket.create_connection(("127.0.0.1", rig.web_port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /nodes/r1/web/big?n=%d HTTP/1.1\r\nHost: hub\r\n"
                 b"Connection: close\r\n\r\n" % size)
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
    wait_stalled(lambda: rss_kib(rig.hub.pid) // 1024, quiet=2.0, timeout=60)
    grown = rss_kib(rig.hub.pid) - before
    gate.set()
    reader.join(120)
    sock.close()
    assert got[0] >= size - 64 * 1024
    # 200 MiB went through; the hub held at most a few windows and socket buffers.
    assert grown < 32 * 1024, f"hub RSS grew {grown} KiB while the reader was stopped"
    assert os.path.exists(f"/proc/{rig.hub.pid}")
