"""The hub logs in to real OpenSSH devices with certificates from its user CA
(`callhomehub ca init`, `[devices] login = "ca"`): devices that trust the CA and
not the management key let approve, `run`, the console gateway and enroll in."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import DeviceSSHD, HubProcess, SSHClient, make_key, wait_for
from tunnel_helpers import Device

pytestmark = pytest.mark.e2e



@pytest.fixture
def ca_hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A hub with `[devices] login = "ca"` and a user CA made before it starts."""
    hub = HubProcess(tmp_path / "hub", "--keepalive", "2")
    hub.data.mkdir(parents=True)
    (hub.data / "callhomehub.toml").write_text('[devices]\nlogin = "ca"\n')
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    created = hub.cli("ca", "init")
    assert b"hub user CA SHA256:" in created.stdout
    hub.start()
    yield hub
    hub.stop()


def trusting(hub: HubProcess, folder: Path, ca_line: str) -> DeviceSSHD:
    """A device sshd that authorizes no key and trusts the user CA `ca_line`."""
    folder.mkdir(parents=True)
    ca_file = folder / "trusted_ca.pub"
    ca_file.write_text(ca_line)
    return DeviceSSHD(folder / "sshd", [], extra_config=f"TrustedUserCAKeys {ca_file}\n").start()


def test_approve_run_and_gateway_reach_a_device_by_certificate(ca_hub: HubProcess,
                                                               tmp_path: Path) -> None:
    pubkey = ca_hub.cli("ca", "pubkey").stdout.decode()
    assert pubkey.startswith("ssh-ed25519 ") and pubkey.count("\n") == 1
    sshd = trusting(ca_hub, tmp_path / "a", pubkey)
    other_ca = make_key(tmp_path / "other_ca", "other")
    stranger = trusting(ca_hub, tmp_path / "b", Path(f"{other_ca}.pub").read_text())
    devices = [Device(ca_hub, tmp_path, "site-a"), Device(ca_hub, tmp_path, "site-b")]
    try:
        devices[0].connect(f"0:127.0.0.1:{sshd.port}")
        devices[1].connect(f"0:127.0.0.1:{stranger.port}")
        approved = ca_hub.cli("approve", "site-a")
        assert b"certificate login as root verified; host key SHA256:" in approved.stdout, (
            approved.stderr)
        # sshd names the certificate it accepted: ours, for this node, as root.
        wait_for(lambda: "Accepted publickey for root" in sshd.log.read_text(), 5,
                 "the device's accepted line")
        accepted = next(line for line in sshd.log.read_text().splitlines()
                        if "Accepted publickey for root" in line)
        assert "ED25519-CERT" in accepted and 'ID callhomehub:site-a (serial' in accepted
        serials = accepted_serials(sshd)

        ran = ca_hub.cli("run", "--nodes", "site-a", "--", "echo", "hi from", "$(id -un)")
        assert "== site-a: ok (exit 0)\nhi from root\n" in ran.stdout.decode()

        key = make_key(tmp_path / "alice", "alice")
        ca_hub.cli("user", "add", "alice", "--key", f"{key}.pub", "--allow", "site-*")
        operator = SSHClient(tmp_path / "operator", ca_hub.port)
        result = operator.run("alice:site-a@127.0.0.1", "echo via the hub CA", key=key)
        assert (result.returncode, result.stdout) == (0, b"via the hub CA\n"), result.stderr

        later = accepted_serials(sshd)  # one login each: approve, run, the gateway
        assert len(later) == 3 and later == sorted(later) and len(set(later)) == 3
        assert later[:len(serials)] == serials

        # A device trusting another CA refuses: the message names the certificate.
        refused = ca_hub.cli("approve", "site-b", check=False)
        assert (b"the device refused the hub's certificate (key ID callhomehub:site-b, "
                b"principal root, signed by the hub user CA) and management key for root"
                in refused.stderr), refused.stderr
    finally:
        for device in devices:
            device.close()
        sshd.stop()
        stranger.stop()


def accepted_serials(sshd: DeviceSSHD) -> list[int]:
    return [int(serial) for serial in re.findall(
        r"Accepted publickey for \S+ .* ID callhomehub:\S+ \(serial (\d+)\)",
        sshd.log.read_text())]


def test_enroll_login_ca_installs_the_ca_line(ca_hub: HubProcess, tmp_path: Path,
                                              device_user: tuple[str, str]) -> None:
    user, password = device_user
    sshd = DeviceSSHD(tmp_path / "sshd", [], extra_config=(
        f"Match User {user}\n  AuthorizedKeysFile .ssh/authorized_keys\n"
        "  PasswordAuthentication yes\n")).start()
    device = Device(ca_hub, tmp_path, "site-a")
    try:
        device.connect(f"0:127.0.0.1:{sshd.port}")
        ca_hub.cli("approve", "site-a", check=False)  # not authorized yet
        for _ in range(2):  # again: nothing added twice
            enrolled = ca_hub.cli("enroll", "site-a", "--user", user, "--login", "ca",
                                  stdin=password.encode())
            assert f"hub CA installed for {user} and verified".encode() in enrolled.stdout or (
                f"hub CA already authorized for {user}".encode() in enrolled.stdout)
        authorized = Path(f"/home/{user}/.ssh/authorized_keys").read_text()
        line = ca_hub.cli("ca", "pubkey", "--user", user).stdout.decode()
        assert line.startswith(f'cert-authority,principals="{user}" ssh-ed25519 ')
        assert authorized == line  # the CA line once, and not the management key
        ran = ca_hub.cli("run", "--nodes", "site-a", "--", "id", "-un")
        assert f"== site-a: ok (exit 0)\n{user}\n" in ran.stdout.decode()
        assert "ED25519-CERT" in sshd.log.read_text()
    finally:
        device.close()
        sshd.stop()


def test_enroll_login_ca_needs_the_config(hub: HubProcess, tmp_path: Path) -> None:
    hub.cli("ca", "init")
    device = Device(hub, tmp_path, "site-a")
    sshd = DeviceSSHD(tmp_path / "sshd", []).start()
    try:
        device.connect(f"0:127.0.0.1:{sshd.port}")
        refused = hub.cli("enroll", "site-a", "--login", "ca", stdin=b"pw\n", check=False)
        assert refused.returncode == 1
        assert b'set [devices] login = "ca" in its config file' in refused.stderr
    finally:
        device.close()
        sshd.stop()
