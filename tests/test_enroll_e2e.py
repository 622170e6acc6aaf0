"""Enrollment with the device password: the hub installs its management key once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DeviceSSHD, HubProcess, SSHClient, make_key
from tunnel_helpers import Device, node

pytestmark = pytest.mark.e2e



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
        assert wrong.stderr == (f"callhomehub: enroll site-a: the device refused the "
                                f"password for {user}\n").encode()

        enrolled = hub.cli("enroll", "site-a", "--user", user, stdin=password.encode())
        assert f"management key installed for {user} and verified".encode() in enrolled.stdout
        authorized = Path(f"/home/{user}/.ssh/authorized_keys").read_text()
        assert authorized.count(hub.cli("mgmt-key").stdout.decode().split()[1]) == 1
        assert node(hub, "site-a")["device_user"] == user
        # Enrolling again adds nothing twice, and says so, whatever the password: the
        # key is taken before the password would be asked for.
        for again in (password, "not-the-password"):
            result = hub.cli("enroll", "site-a", "--user", user, stdin=again.encode())
            assert result.stdout.startswith(
                f"node site-a: management key already authorized for {user}: nothing "
                "installed (the password was not used); host key SHA256:".encode())
            assert b"installed for" not in result.stdout
        assert Path(f"/home/{user}/.ssh/authorized_keys").read_text() == authorized
        enrolls = [e["detail"] for e in json.loads(hub.cli("audit", "--json").stdout)
                   if e["action"] == "enroll"]
        assert enrolls == [f"user {user}: management key installed"] + [
            f"user {user}: management key already authorized, nothing installed"] * 2

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


def test_device_sshd_down_is_said_in_words(hub: HubProcess, tmp_path: Path) -> None:
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    sshd = DeviceSSHD(tmp_path / "sshd", [mgmt]).start()
    device = Device(hub, tmp_path, "site-a")
    try:
        device.connect(f"0:127.0.0.1:{sshd.port}")
        assert b"pinned" in hub.cli("approve", "site-a").stdout  # verified, host key pinned
        sshd.stop()  # the device stays connected; its SSH service is gone
        approved = hub.cli("approve", "site-a")
        said = ("the device's SSH service behind its forward localhost:0 refused the "
                "connection: Connection refused (code 2, connect failed)")
        assert approved.stderr.decode() == f"warning: {said}\n"
        alice = make_key(tmp_path / "alice", "alice")
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "*")
        operator = SSHClient(tmp_path / "op", hub.port)
        result = operator.run("alice:site-a@127.0.0.1", "id", key=alice)
        assert result.returncode != 0
        assert f"cannot log in to site-a: {said}".encode() in result.stderr, result.stderr
        for text in (approved.stderr, result.stderr, hub.log_text().encode()):
            assert b"(b'" not in text and b"Failure instance" not in text
        assert b"callhomehub enroll" not in approved.stderr  # enrolling would not help
    finally:
        device.close()
