"""The hub process as an operator starts it: start-up errors, crashes, the CLI."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import CLI, TWISTD, HubProcess, SSHClient, make_key
from tunnel_helpers import Device

pytestmark = pytest.mark.e2e


def start_fails(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "callhomehub", "--metrics", "none",
                             "--web", "none", "--workers", "1", *args],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    return result


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start_fails(tmp_path, "--data", str(tmp_path),
                             "--ssh", f"tcp:{port}:interface=127.0.0.1")
    assert f"callhomehub: cannot listen on tcp:{port}:interface=127.0.0.1 (SSH)" in (
        result.stderr + result.stdout)
    assert "Address already in use" in result.stderr + result.stdout


def test_second_hub_on_one_data_directory_is_one_line_and_touches_nothing(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").start()
    try:
        hub.cli("user", "add", "alice", "--password-stdin", stdin=b"pw")
        with sqlite3.connect(hub.data / "hub.sqlite3") as db:
            db.execute("INSERT INTO nodes (name, state, created, online) "
                       "VALUES ('site-a', 'approved', 0, 1)")
        result = start_fails(tmp_path, "--data", str(hub.data),
                             "--ssh", "tcp:0:interface=127.0.0.1")
        assert result.stderr.strip().splitlines()[-1] == (
            f"callhomehub: --data {hub.data}: another hub is running on this data directory "
            f"(pid {hub.proc.pid}); stop it first")
        with sqlite3.connect(hub.data / "hub.sqlite3") as db:
            assert db.execute("SELECT online FROM nodes WHERE name = 'site-a'").fetchall() == [
                (1,)]
        assert hub.proc.poll() is None
    finally:
        hub.stop()


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("config", [], "unknown key 'pasword' in [nsca]"),
    (None, ["--port-range", "70000-80000"], "--port-range: 70000-80000 is not within"),
    (None, ["--keepalive", "often"], "--keepalive: expected a number"),
    (None, ["--ssh", "2222"], "--ssh: '2222' is not a listening endpoint"),
    (None, ["--nsca", "tcp:x"], "--nsca: 'tcp:x' is not a listening endpoint"),
    (None, ["--metrics", "tcp:x"], "--metrics: 'tcp:x' is not a listening endpoint"),
    (None, ["--web", "ssl:x"], "--web: 'ssl:x' is not a listening endpoint"),
    (None, ["--web", "tcp:0:interface=127.0.0.1", "--web-url", "hub.example"],
     "--web-url: expected https://HOST"),
    ("file-as-data", [], "cannot create"),
    ("corrupt-db", [], "is unreadable or corrupt"),
])
def test_bad_start_is_one_clear_line(tmp_path: Path, setup: str | None, args: list[str],
                                     message: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if setup == "config":
        (data / "callhomehub.toml").write_text('[nsca]\npasword = "x"\n')
    elif setup == "file-as-data":
        data = tmp_path / "data" / "file"
        data.write_text("")
    elif setup == "corrupt-db":
        (data / "hub.sqlite3").write_bytes(b"not a database" * 300)
    result = start_fails(tmp_path, "--data", str(data), *args)
    assert result.stderr.strip().splitlines()[-1].startswith("callhomehub: ")
    assert message in result.stderr
    if setup == "corrupt-db":
        assert (data / "hub.sqlite3").read_bytes() == b"not a database" * 300


def test_sigkill_during_registrations_leaves_a_consistent_registry(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    client = SSHClient(tmp_path / "client", hub.port)
    keys = [make_key(tmp_path / f"k{i}", f"dev-{i}") for i in range(24)]
    acknowledged: list[str] = []
    failures: list[bytes] = []

    def device(i: int) -> None:
        result = client.run("cms@127.0.0.1", "register", f"dev-{i}",
                            password=CALLHOME_PASSWORD,
                            stdin=Path(f"{keys[i]}.pub").read_bytes())
        if result.returncode == 0:
            acknowledged.append(f"dev-{i}")
        else:
            failures.append(result.stderr)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(len(keys))]
    try:
        for t in threads[:12]:
            t.start()
        for t in threads[:12]:
            t.join()
        assert len(acknowledged) == 12, failures
    except BaseException:
        hub.stop()  # leave no hub behind when the first wave fails
        raise
    for t in threads[12:]:
        t.start()
    hub.stop(signal.SIGKILL)  # in the middle of the second wave
    for t in threads[12:]:
        t.join()

    db = sqlite3.connect(hub.data / "hub.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    listed = json.loads(hub.cli("nodes", "--json").stdout)
    names = {n["name"] for n in listed}
    assert set(acknowledged) <= names  # nothing acknowledged was lost
    audit = json.loads(hub.cli("audit", "--json").stdout)
    assert {e["target"] for e in audit if e["action"] == "register"} == names

    # The restarted hub serves from the same registry; nodes start offline.
    hub.start()
    try:
        assert not any(n["online"] for n in json.loads(hub.cli("nodes", "--json").stdout))
        client.port = hub.port
        again = client.run("cms@127.0.0.1", key=keys[0])
        assert again.returncode == 1 and b"does not have shell access" in again.stderr
    finally:
        hub.stop()


def test_cli_users_and_errors(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = make_key(tmp_path / "alice", "alice@laptop")

    def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, "--data", str(data), *args], input=stdin.decode(),
                              capture_output=True, text=True, timeout=30)

    added = cli("user", "add", "alice", "--key", f"{key}.pub", "--password-stdin",
                "--allow", "site-*", "lab-1", stdin=b"pw\n")
    assert added.returncode == 0, added.stderr
    users = json.loads(cli("users", "--json").stdout)
    assert users == [{"name": "alice", "password": True, "allow": ["site-*", "lab-1"],
                      "keys": [users[0]["keys"][0]], "admin": False}]
    assert users[0]["keys"][0].startswith("SHA256:")
    dup = cli("user", "add", "ALICE", "--password-stdin", stdin=b"x\n")
    assert (dup.returncode, dup.stderr) == (1, "callhomehub: user 'ALICE' already exists\n")
    nokey = cli("user", "add", "bob")
    assert nokey.returncode == 1 and "--key" in nokey.stderr
    badkey = cli("user", "add", "bob", "--key", str(key))
    assert badkey.returncode == 1 and "private key" in badkey.stderr
    assert cli("user", "del", "alice").returncode == 0
    missing = cli("approve", "nosuch")
    assert (missing.returncode, missing.stderr) == (1, "callhomehub: no node named 'nosuch'\n")
    assert cli("users").stdout.splitlines() == ["NAME  PASSWORD  KEYS  ALLOW  ADMIN"]
    actions = [e["action"] for e in json.loads(cli("audit", "--json").stdout)]
    assert actions == ["user-add", "user-del"]
    empty_pw = cli("callhome-password")
    assert empty_pw.returncode == 1 and "empty password" in empty_pw.stderr


def test_devices_hear_why_when_the_hub_stops(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    device = Device(hub, tmp_path, "site-a")
    try:
        device.connect("0:127.0.0.1:22")
        hub.stop()
        assert device.proc is not None
        device.proc.wait(timeout=10)
        assert b"the hub is shutting down" in device.stderr()
    finally:
        device.close()
        hub.stop()
