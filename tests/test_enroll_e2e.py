"""Enrollment with the device password: the hub installs its management key once."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DeviceSSHD, HubProcess, SSHClient, make_key
from tunnel_helpers import Device, node

pytestmark = pytest.mark.e2e

USER = f"chhe{os.getpid()}"  # per run: concurrent runs must not share an account


@pytest.fixture
def device_user() -> Iterator[tuple[str, str]]:
    """A throwaway local account with a password, for the device's sshd."""
    if os.geteuid() != 0:
        pytest.skip("creating a device account needs root")
    password = secrets.token_urlsafe(12)
    subprocess.run(["userdel", "-r", USER], capture_output=True)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True, capture_output=True)
    subprocess.run(["chpasswd"], input=f"{USER}:{password}".encode(), check=True)
    yield USER, password
    subprocess.run(["userdel", "-r", USER], capture_output=True)


def test_enroll_installs_the_key_and_pins_the_host_key(hub: HubProcess, tmp_path: Path,
                                                      device_user: tuple[str, str]) -> None:
    user, password = device_user
    sshd = DeviceSSHD(tmp_path / "sshd", [], extra_config=(
        f"Match User {user}\n  AuthorizedKeysFile .ssh/authorized_keys\n"
        "  PasswordAuthentication yes\n")).start()
    device = Device(hub, tmp_path, "site-a")
    try:
        device.connect(f"0:127.0.0.1:{sshd.port}")
        approved = hub.cli("approve", "site-a")
        assert b"run: callhomehub enroll site-a" in approved.stderr  # key not authorized yet

        wrong = hub.cli("enroll", "site-a", "--user", user, stdin=b"not-the-password\n",
                        check=False)
        assert wrong.returncode == 1
        assert wrong.stderr.startswith(b"callhomehub: enroll site-a: ")
        assert len(wrong.stderr.splitlines()) == 1

        enrolled = hub.cli("enroll", "site-a", "--user", user, stdin=password.encode())
        assert f"management key installed for {user} and verified".encode() in enrolled.stdout
        authorized = Path(f"/home/{user}/.ssh/authorized_keys").read_text()
        assert authorized.count(hub.cli("mgmt-key").stdout.decode().split()[1]) == 1
        assert node(hub, "site-a")["device_user"] == user
        # Enrolling again adds nothing twice.
        hub.cli("enroll", "site-a", "--user", user, stdin=password.encode())
        assert Path(f"/home/{user}/.ssh/authorized_keys").read_text() == authorized

        alice = make_key(tmp_path / "alice", "alice")
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "*")
        operator = SSHClient(tmp_path / "op", hub.port)
        result = operator.run("alice:site-a@127.0.0.1", "id -un", key=alice)
        assert (result.returncode, result.stdout) == (0, f"{user}\n".encode()), result.stderr
        actions = [e["action"] for e in json.loads(hub.cli("audit", "--json").stdout)]
        assert "enroll" in actions and "gateway" in actions
        assert password not in hub.log_text()
        assert password.encode() not in (hub.data / "hub.sqlite3").read_bytes()
    finally:
        device.close()
        sshd.stop()


def test_enroll_needs_a_running_hub_and_an_online_node(hub: HubProcess, tmp_path: Path) -> None:
    Device(hub, tmp_path, "site-a")  # registered, never connected
    offline = hub.cli("enroll", "site-a", stdin=b"pw\n", check=False)
    assert offline.returncode == 1
    assert b"node site-a is offline" in offline.stderr
    hub.stop()
    stopped = hub.cli("enroll", "site-a", stdin=b"pw\n", check=False)
    assert stopped.returncode == 1 and b"the hub is not running" in stopped.stderr
