"""Operator certificates with the real OpenSSH: `ssh-keygen -s` signs, `ssh` logs in."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import define
from conftest import CALLHOME_PASSWORD
from helpers import DeviceSSHD, HubProcess, SSHClient, make_key, wait_for
from tunnel_helpers import Device

pytestmark = pytest.mark.e2e


@define
class Site:
    hub: HubProcess
    operator: SSHClient
    ca: Path
    tmp: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A hub trusting one user CA, certificate-only operator alice, and site-a online
    (one for the module: each test signs keys of its own)."""
    tmp_path = tmp_path_factory.mktemp("certs")
    ca = make_key(tmp_path / "user_ca", "ca")
    hub = HubProcess(tmp_path / "hub", "--keepalive", "2")
    hub.data.mkdir(parents=True)
    (hub.data / "callhomehub.toml").write_text(
        f'[operators]\ntrusted_ca_keys = ["{ca}.pub"]\n')
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    added = hub.cli("user", "add", "alice", "--cert-only", "--allow", "site-*")
    assert b"certificate logins only" in added.stdout
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    sshd = DeviceSSHD(tmp_path / "sshd", [mgmt]).start()
    device = Device(hub, tmp_path, "site-a")
    device.connect(f"0:127.0.0.1:{sshd.port}")
    hub.cli("approve", "site-a")
    yield Site(hub, SSHClient(tmp_path / "operator", hub.port), ca, tmp_path)
    device.close()
    sshd.stop()
    hub.stop()


def certified(site: Site, name: str, *sign: str) -> Path:
    """A new key for `name`, with `name-cert.pub` beside it (ssh picks it up)."""
    folder = site.tmp / f"key{len(list(site.tmp.glob('key*')))}"
    folder.mkdir()
    key = make_key(folder / name, name)
    subprocess.run(["ssh-keygen", "-q", "-s", str(site.ca), "-I", f"{name}@corp", *sign,
                    f"{key}.pub"], check=True, capture_output=True)
    assert Path(f"{key}-cert.pub").exists()
    return key


def test_a_certificate_logs_in_with_every_login_name_form(site: Site) -> None:
    key = certified(site, "alice", "-n", "alice", "-z", "5", "-V", "-5m:+1h")
    result = site.operator.run("alice:site-a@127.0.0.1", "echo via cert", key=key)
    assert (result.returncode, result.stdout) == (0, b"via cert\n"), result.stderr
    jump = site.operator.run("alice@127.0.0.1", key=key, options=["-W", "site-a:22"])
    assert jump.stdout.startswith(b"SSH-2.0-OpenSSH"), jump.stderr
    wait_for(lambda: "Accepted publickey for alice:site-a from 127.0.0.1" in
             site.hub.log.read_text(), 5, "the accepted line")
    line = next(x for x in site.hub.log.read_text().splitlines()
                if "Accepted publickey for alice:site-a" in x)
    assert "ED25519-CERT SHA256:" in line and "ID alice@corp (serial 5) CA ED25519" in line


@pytest.mark.parametrize(("sign", "why"), [
    (("-n", "alice", "-V", "-2d:-1d"), "certificate has expired"),
    (("-n", "bob", "-V", "-5m:+1h"), "certificate principals do not include alice"),
    (("-n", "alice", "-O", "source-address=10.0.0.0/8"),
     "certificate is not valid from 127.0.0.1 (source-address 10.0.0.0/8)"),
    # OpenSSH does not offer a host certificate as a user one; the hub's refusal of one
    # is tested in test_certs.py.
    (("-h", "-n", "alice"), None),
])
def test_certificates_outside_their_terms_are_refused(site: Site, sign: tuple[str, ...],
                                                      why: str | None) -> None:
    key = certified(site, "alice", *sign)
    accepted = site.hub.log.read_text().count("Accepted publickey for alice")
    result = site.operator.run("alice:site-a@127.0.0.1", "true", key=key)
    assert result.returncode == 255 and b"Permission denied" in result.stderr
    assert site.hub.log.read_text().count("Accepted publickey for alice") == accepted
    if why is not None:
            wait_for(lambda: f"certificate refused for alice:site-a: {why}" in
                 site.hub.log.read_text(), 5, why)


def test_a_revoked_serial_is_refused_at_the_next_login(site: Site) -> None:
    key = certified(site, "alice", "-n", "alice", "-z", "42")
    assert site.operator.run("alice:site-a@127.0.0.1", "true", key=key).returncode == 0
    site.hub.cli("cert", "revoke", "--serial", "42")
    result = site.operator.run("alice:site-a@127.0.0.1", "true", key=key)
    assert result.returncode == 255 and b"Permission denied" in result.stderr
    wait_for(lambda: "certificate serial 42 key ID 'alice@corp' is revoked" in
             site.hub.log.read_text(), 5, "the revocation reason")
    assert b"42" in site.hub.cli("cert", "revoked").stdout
