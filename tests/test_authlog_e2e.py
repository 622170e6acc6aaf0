"""Authentication outcomes in sshd's words, read by fail2ban's own fail2ban-regex."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import HubProcess, SSHClient, make_key, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "callhomehub.conf"


def test_auth_lines_and_the_fail2ban_filter(hub: HubProcess, client: SSHClient,
                                            tmp_path: Path) -> None:
    key = make_key(tmp_path / "dev", "site-a")
    ok = client.run("cms@127.0.0.1", "register", "site-a", password=CALLHOME_PASSWORD,
                    stdin=Path(f"{key}.pub").read_bytes())
    assert ok.returncode == 0, ok.stderr
    for _ in range(2):
        assert client.run("cms@127.0.0.1", "register", password="wrong").returncode == 255
    assert client.run("mallory@127.0.0.1", password="guess").returncode == 255
    assert client.run("cms@127.0.0.1", key=key).returncode == 1  # key login, no shell
    port = r"port \d+ ssh2"
    wanted = [rf"Accepted password for cms from 127\.0\.0\.1 {port}$",
              rf"Failed password for cms from 127\.0\.0\.1 {port}$",
              r"Invalid user mallory from 127\.0\.0\.1 port \d+$",
              rf"Failed password for invalid user mallory from 127\.0\.0\.1 {port}$",
              rf"Accepted publickey for cms from 127\.0\.0\.1 {port}: ED25519 SHA256:\S+$"]
    wait_for(lambda: all(re.search(w, hub.log_text(), re.M) for w in wanted), 10,
             "the authentication lines")
    assert "b'cms'" not in hub.log_text()
    # The denied attempts are audited too.
    audit = hub.cli("audit").stdout.decode()
    assert audit.count("login-failed") == 3
    result = subprocess.run(["fail2ban-regex", str(hub.log), str(FILTER)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # Two wrong Call Home Passwords, and mallory twice (Invalid user, Failed password).
    assert re.search(r"Lines: \d+ lines, 0 ignored, 4 matched", result.stdout), result.stdout


def test_failed_web_sign_ins_match_the_fail2ban_filter(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    hub = HubProcess(tmp_path / "hub", "--web", "tcp:0:interface=127.0.0.1").start()
    try:
        hub.cli("user", "add", "alice", "--password-stdin", stdin=b"right")
        for user in ("alice", "mallory"):
            request = urllib.request.Request(
                f"http://127.0.0.1:{hub.ports['web']}/signin",
                data=f"user={user}&password=wrong".encode(), method="POST")
            try:
                urllib.request.urlopen(request, timeout=30)
            except urllib.error.HTTPError as e:
                assert e.code == 401
        wait_for(lambda: "Failed web sign-in for mallory from 127.0.0.1" in hub.log_text(),
                 30, "the web sign-in failure lines")
        result = subprocess.run(["fail2ban-regex", str(hub.log), str(FILTER)],
                                capture_output=True, text=True, timeout=120)
        assert re.search(r"Lines: \d+ lines, 0 ignored, 2 matched", result.stdout), result.stdout
    finally:
        hub.stop()
