"""The hub user CA: the certificates it issues, and how the hub's client offers them."""

from __future__ import annotations

import base64
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.ssh.common import NS, getNS
from twisted.internet import defer

from hub.access.device_client import DeviceConnection, DeviceUserAuth
from hub.app.cli import main
from hub.app.config import build_config
from hub.errors import BadKey, ConfigError
from hub.ssh.keys import load_hub_keys
from hub.ssh.usercerts import (
    USER_CA_FILE,
    DeviceIdentity,
    HubUserCA,
    UserCertificate,
    create_user_ca,
    load_user_ca,
)

NOW = 1_800_000_000.0


def certificate_of(offer: UserCertificate) -> ssh.SSHCertificate:
    cert = ssh.load_ssh_public_identity(offer.algorithm + b" " + base64.b64encode(offer.blob()))
    assert isinstance(cert, ssh.SSHCertificate)
    return cert


def test_a_certificate_is_short_lived_for_one_user_and_node(tmp_path: Path) -> None:
    ca = create_user_ca(str(tmp_path))
    mgmt = load_hub_keys(str(tmp_path)).mgmt
    issued = HubUserCA(str(tmp_path), lambda: NOW).certify(mgmt, "root", "site-a")
    assert issued is not None
    assert issued.algorithm == b"ssh-ed25519-cert-v01@openssh.com"
    assert issued.signature_type() == b"ssh-ed25519"
    cert = certificate_of(issued)
    assert cert.type == ssh.SSHCertificateType.USER
    assert cert.key_id == b"callhomehub:site-a"
    assert cert.valid_principals == [b"root"]
    assert (cert.valid_after, cert.valid_before) == (NOW - 60, NOW + 300)
    assert cert.critical_options == {}
    assert set(cert.extensions) == {b"permit-pty", b"permit-port-forwarding",
                                    b"permit-user-rc"}
    cert.verify_cert_signature()  # signed by the CA ...
    assert cert.signature_key().public_bytes(
        ssh.Encoding.OpenSSH, ssh.PublicFormat.OpenSSH) == ca.public().toString("openssh")
    # ... for the management key
    assert cert.public_key().public_bytes(ssh.Encoding.OpenSSH, ssh.PublicFormat.OpenSSH) == (
        mgmt.public().toString("openssh"))


def test_serials_only_grow_even_when_the_clock_does_not(tmp_path: Path) -> None:
    create_user_ca(str(tmp_path))
    mgmt = load_hub_keys(str(tmp_path)).mgmt
    now = [NOW]
    ca = HubUserCA(str(tmp_path), lambda: now[0])
    serials = []
    for step in (0.0, 0.0, -10.0, 5.0):
        now[0] += step
        issued = ca.certify(mgmt, "root", "n")
        assert issued is not None
        serials.append(issued.serial)
    assert serials == sorted(serials) and len(set(serials)) == 4
    # A restarted hub (a new HubUserCA) starts above what it issued before, once its
    # clock has passed the time of the last one.
    again = HubUserCA(str(tmp_path), lambda: NOW + 1).certify(mgmt, "root", "n")
    assert again is not None and again.serial > serials[-1]


def test_offers_certificate_then_key_only_with_a_ca(tmp_path: Path) -> None:
    mgmt = load_hub_keys(str(tmp_path)).mgmt
    ca = HubUserCA(str(tmp_path), lambda: NOW)
    assert DeviceIdentity(mgmt).offers("root", "n") == [mgmt.public()]
    assert DeviceIdentity(mgmt, ca).offers("root", "n") == [mgmt.public()]  # no CA yet
    create_user_ca(str(tmp_path))
    first, second = DeviceIdentity(mgmt, ca).offers("root", "n")
    assert isinstance(first, UserCertificate) and second == mgmt.public()
    (only,) = DeviceIdentity(mgmt, ca, key_fallback=False).offers("root", "n")
    assert isinstance(only, UserCertificate)
    (tmp_path / USER_CA_FILE).write_text("garbage")  # logged; the key still works
    assert DeviceIdentity(mgmt, ca).offers("root", "n") == [mgmt.public()]


def test_ca_init_refuses_to_replace_without_force(tmp_path: Path) -> None:
    first = create_user_ca(str(tmp_path / "keys"))
    assert stat.S_IMODE((tmp_path / "keys" / USER_CA_FILE).stat().st_mode) == 0o600
    with pytest.raises(BadKey, match="--force"):
        create_user_ca(str(tmp_path / "keys"))
    assert load_user_ca(str(tmp_path / "keys")) == first
    assert create_user_ca(str(tmp_path / "keys"), force=True) != first


def test_ca_cli_init_pubkey_and_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    data = ["--data", str(tmp_path)]
    assert main([*data, "callhome-password"]) in (0, 1)  # creates the registry
    assert main([*data, "ca", "pubkey"]) == 1
    assert "the hub has no user CA; run: callhomehub ca init" in capsys.readouterr().err
    assert main([*data, "ca", "init"]) == 0
    assert "created" in capsys.readouterr().out
    assert main([*data, "ca", "init"]) == 1
    assert "Pass --force" in capsys.readouterr().err
    assert main([*data, "ca", "init", "--force"]) == 0
    assert main([*data, "ca", "pubkey"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("ssh-ed25519 ")
    assert main([*data, "ca", "pubkey", "--user", "admin"]) == 0
    assert capsys.readouterr().out == f'cert-authority,principals="admin" {line}\n'
    assert main([*data, "audit", "--json"]) == 0
    audit = capsys.readouterr().out
    assert audit.count('"ca init"') == 2 and "(replaced)" in audit


def test_config_devices_login(tmp_path: Path) -> None:
    assert build_config({"data": str(tmp_path)}).device_login == "key"
    (tmp_path / "callhomehub.toml").write_text('[devices]\nlogin = "ca"\n')
    assert build_config({"data": str(tmp_path)}).device_login == "ca"
    (tmp_path / "callhomehub.toml").write_text('[devices]\nlogin = "cert"\n')
    with pytest.raises(ConfigError, match=r'\[devices\] login: expected "key" or "ca"'):
        build_config({"data": str(tmp_path)})


class RecordingTransport:
    """What DeviceUserAuth sends, for the test to read."""

    def __init__(self) -> None:
        self.sessionID = b"session-id"
        self.peerExtensions: dict[bytes, bytes] = {}
        self.packets: list[tuple[int, bytes]] = []
        self.certificate: Any = None

    def sendPacket(self, kind: int, payload: bytes) -> None:
        self.packets.append((kind, payload))


def test_the_client_offers_the_certificate_and_signs_with_the_plain_key(tmp_path: Path
                                                                        ) -> None:
    create_user_ca(str(tmp_path))
    mgmt = load_hub_keys(str(tmp_path)).mgmt
    offers = DeviceIdentity(mgmt, HubUserCA(str(tmp_path), lambda: NOW)).offers("root", "n")
    auth = DeviceUserAuth(b"root", mgmt, None, DeviceConnection(defer.Deferred()), offers)
    transport = RecordingTransport()
    auth.transport = transport
    assert auth.auth_publickey().result is True  # type: ignore[attr-defined]
    _, query = transport.packets[-1]
    user, service, method, rest = getNS(query, 3)
    algorithm, blob, _ = getNS(rest[1:], 2)
    assert (user, method, rest[:1]) == (b"root", b"publickey", b"\x00")
    assert algorithm == b"ssh-ed25519-cert-v01@openssh.com" and blob == offers[0].blob()
    assert transport.certificate == offers[0]

    auth.ssh_USERAUTH_PK_OK(NS(algorithm) + NS(blob))
    _, signed = transport.packets[-1]
    user, service, method, rest = getNS(signed, 3)
    algorithm2, blob2, signature, _ = getNS(rest[1:], 3)
    assert (rest[:1], algorithm2, blob2) == (b"\x01", algorithm, blob)
    # The signature is the plain ed25519 key's, over the request with the certificate.
    assert getNS(signature)[0] == b"ssh-ed25519"
    data = (NS(b"session-id") + bytes((50,)) + NS(b"root") + NS(service) + NS(b"publickey")
            + b"\x01" + NS(algorithm) + NS(blob))
    assert mgmt.public().verify(signature, data)
