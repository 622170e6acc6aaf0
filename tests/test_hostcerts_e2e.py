"""The hub presents a host certificate: the real `ssh`, trusting only a host CA
(`@cert-authority` in known_hosts, StrictHostKeyChecking=yes), accepts the hub,
also after its host key is rotated and certified again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import SSH, HubProcess, make_key, wait_for

pytestmark = pytest.mark.e2e


def ssh_by_ca(hub: HubProcess, tmp_path: Path, ca: Path) -> subprocess.CompletedProcess[bytes]:
    """`ssh` to the hub knowing nothing but `@cert-authority * CA` (no registered key:
    past the host key check it is refused at login)."""
    known = tmp_path / "known_hosts_ca"
    known.write_text(f"@cert-authority * {Path(f'{ca}.pub').read_text()}")
    key = tmp_path / "nobody"
    if not key.exists():
        make_key(key, "nobody")
    return subprocess.run(
        [SSH or "ssh", "-v", "-F", "/dev/null", "-p", str(hub.port), "-i", str(key),
         "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
         "-o", "HostKeyAlgorithms=ssh-ed25519-cert-v01@openssh.com",
         "nobody@127.0.0.1", "true"], capture_output=True, timeout=30)


def host_key_checked(result: subprocess.CompletedProcess[bytes]) -> bool:
    err = result.stderr.decode()
    return ("matches the ED25519-CERT host certificate" in err
            and "Permission denied (" in err)


def test_ssh_trusts_the_hub_by_its_host_ca_across_a_rotation(tmp_path: Path) -> None:
    ca = make_key(tmp_path / "host_ca", "host-ca")
    hub = HubProcess(tmp_path / "hub", "--keepalive", "2")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    keys = hub.data / "keys"
    try:
        hub.start()
        # No certificate yet: only the CA is known, so the host key is not trusted.
        refused = ssh_by_ca(hub, tmp_path, ca)
        assert refused.returncode != 0 and not host_key_checked(refused)
        hub.stop()

        # Signed elsewhere with ssh-keygen and placed beside the key.
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-h", "-I", "hub", "-n",
                        "127.0.0.1,hub.example", f"{keys / 'ssh_host_ed25519_key.pub'}"],
                       check=True, capture_output=True)
        shown = hub.cli("host-cert")
        assert b"key ID 'hub', principals 127.0.0.1,hub.example" in shown.stdout
        hub.start()
        wait_for(lambda: "presenting host certificate" in hub.log_text(), 5, "the start line")
        assert "key ID 'hub', principals 127.0.0.1,hub.example, valid" in hub.log_text()
        accepted = ssh_by_ca(hub, tmp_path, ca)
        assert host_key_checked(accepted), accepted.stderr.decode()[-2000:]
        hub.stop()

        # Rotation: a new host key; the old certificate is for the old key.
        for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
            (keys / name).unlink()
        hub.start()
        wait_for(lambda: "not presented: it certifies another key" in hub.log_text(), 5,
                 "the warning")
        assert not host_key_checked(ssh_by_ca(hub, tmp_path, ca))
        signed = hub.cli("host-cert", "--ca", str(ca), "--principals", "127.0.0.1",
                         "--validity", "30")
        assert b"restart the hub to present it" in signed.stdout
        assert b"key ID 'callhomehub:127.0.0.1', principals 127.0.0.1" in signed.stdout
        hub.stop()
        hub.start()
        again = ssh_by_ca(hub, tmp_path, ca)
        assert host_key_checked(again), again.stderr.decode()[-2000:]

        # A client knowing the plain key keeps getting the plain key.
        plain = tmp_path / "known_hosts_plain"
        plain.write_text(f"[127.0.0.1]:{hub.port} "
                         f"{(keys / 'ssh_host_ed25519_key.pub').read_text()}")
        result = subprocess.run(
            [SSH or "ssh", "-v", "-F", "/dev/null", "-p", str(hub.port), "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={plain}", "-o", "StrictHostKeyChecking=yes",
             "-i", str(tmp_path / "nobody"), "-o", "IdentitiesOnly=yes",
             "nobody@127.0.0.1", "true"], capture_output=True, timeout=30)
        assert b"Permission denied (" in result.stderr
        assert b"matches the ED25519 host key" in result.stderr
        audit = hub.cli("audit").stdout.decode()
        assert "host-cert" in audit
    finally:
        hub.stop()
