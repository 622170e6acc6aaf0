"""Web sessions and sign-in links kept in the registry, with real processes: a session
outlives a hub restart, and with `--workers 2` a `weblink` from either worker (real
OpenSSH client) signs in on worker 0's console."""

from __future__ import annotations

import http.client
import re
from pathlib import Path

import pytest
from helpers import SSH, HubProcess, SSHClient, free_port, make_key, wait_for
from web_client import sign_in

pytestmark = pytest.mark.e2e

ISSUED = re.compile(r"\[(w\d+ )?hub\.access\.session#info\] alice@[\d.]+: web sign-in link issued")


def get(port: int, path: str, cookie: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        response = conn.getresponse()
        response.read()
        return response.status, response.headers.get("location") or ""
    finally:
        conn.close()


def spend(url: str) -> tuple[int, str]:
    """POST a sign-in link; (status, the session cookie's value or '')."""
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/signin/\S+)", url)
    assert match, url
    conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
    try:
        conn.request("POST", match.group(2), body=b"",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        cookies = response.headers.get_all("set-cookie") or []
    finally:
        conn.close()
    found = [c.split(";", 1)[0] for c in cookies if c.startswith("__Host-chh-session=")]
    return response.status, found[0] if found else ""


def test_a_web_session_survives_a_hub_restart(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", "--web", "tcp:0:interface=127.0.0.1")
    hub.data.mkdir(parents=True)
    hub.cli("user", "add", "alice", "--allow", "*", "--password-stdin", stdin=b"alice-pw")
    hub.start()
    try:
        cookie = sign_in(hub.ports["web"], "alice", "alice-pw")
        assert get(hub.ports["web"], "/nodes", cookie)[0] == 200
    finally:
        hub.stop()
    hub.start()  # the same data directory
    try:
        assert get(hub.ports["web"], "/nodes", cookie)[0] == 200
        assert get(hub.ports["web"], "/nodes", "__Host-chh-session=forged") == (302, "/signin")
        rows = hub.cli("audit").stdout.decode()
        assert "web-signin" in rows
        # The registry holds no session id: reading it signs no one in.
        assert cookie.split("=", 1)[1].encode() not in (hub.data / "hub.sqlite3").read_bytes()
    finally:
        hub.stop()


def test_weblink_from_either_worker_signs_in(tmp_path: Path) -> None:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    web = free_port()
    hub = HubProcess(tmp_path / "hub", "--workers", "2",
                     "--web", f"tcp:{web}:interface=127.0.0.1")
    hub.data.mkdir(parents=True)
    key = make_key(tmp_path / "alice", "alice")
    hub.cli("user", "add", "alice", "--allow", "*", "--key", f"{key}.pub")
    hub.start()
    client = SSHClient(tmp_path / "client", hub.port)
    try:
        served: dict[str, int] = {}
        for _ in range(40):  # the kernel spreads connections: until both served one
            result = client.run("alice@127.0.0.1", "weblink", key=key)
            assert result.returncode == 0, result.stderr
            url = result.stdout.decode().strip()
            assert re.fullmatch(rf"http://127\.0\.0\.1:{web}/signin/[A-Za-z0-9_-]{{43}}", url)
            # Worker 1's log records reach the hub's log through worker 0.
            count = sum(served.values()) + 1
            wait_for(lambda: len(ISSUED.findall(hub.log_text())) == count, 10,  # noqa: B023
                     "the link's log line")
            worker = ISSUED.findall(hub.log_text())[-1].strip() or "w0"
            status, cookie = spend(url)
            assert status == 303 and cookie, (worker, status)
            assert get(web, "/nodes", cookie)[0] == 200
            assert spend(url)[0] == 403  # once
            served[worker] = served.get(worker, 0) + 1
            if len(served) == 2:
                break
        assert set(served) == {"w0", "w1"}, served
    finally:
        hub.stop()
