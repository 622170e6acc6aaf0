"""The hub's host certificate: which certificates it presents, and how its server
transport sends one in the key exchange."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from attrs import evolve
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh
from memory_hub import make_hub, start_factory
from twisted.conch.ssh import keys
from twisted.conch.ssh.common import getNS
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent

from hub.app.cli import main
from hub.errors import BadKey
from hub.ssh.hostcerts import (
    HOST_CERT_ALGORITHM,
    HOST_CERT_FILE,
    check_host_certificate,
    present_host_certificate,
    sign_host_certificate,
)
from hub.ssh.keys import load_hub_keys

NOW = 1_800_000_000.0


def ca_text() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        ssh.Encoding.PEM, ssh.PrivateFormat.OpenSSH, ssh.NoEncryption())


def certificate(host: keys.Key, kind: ssh.SSHCertificateType = ssh.SSHCertificateType.HOST,
                after: float = NOW - 60, before: float = NOW + 3600) -> bytes:
    public = ssh.load_ssh_public_key(host.public().toString("openssh"))
    builder = (ssh.SSHCertificateBuilder().public_key(public).serial(1).type(kind)  # type: ignore[arg-type]
               .key_id(b"hub").valid_principals([b"hub.example"])
               .valid_after(int(after)).valid_before(int(before)))
    return builder.sign(ed25519.Ed25519PrivateKey.generate()).public_bytes()


def host_key(tmp_path: Path) -> keys.Key:
    return load_hub_keys(str(tmp_path / "keys")).host_private[b"ssh-ed25519"]


def test_a_signed_host_certificate_for_the_current_key_is_presented(tmp_path: Path) -> None:
    key = host_key(tmp_path)
    line = sign_host_certificate(ca_text(), key, ["hub.example", "10.0.0.1"], "callhomehub:hub",
                                 30, NOW)
    found = check_host_certificate(line, key, NOW)
    assert (found.key_id, found.principals) == ("callhomehub:hub", ("hub.example", "10.0.0.1"))
    assert (found.valid_after, found.valid_before) == (NOW - 300, NOW + 30 * 86400)
    assert found.ca_fingerprint.startswith("SHA256:")
    assert "principals hub.example,10.0.0.1, valid 2027-01-15" in found.describe()


@pytest.mark.parametrize(("make", "why"), [
    (lambda key: certificate(key, after=NOW - 7200, before=NOW - 60), "it has expired"),
    (lambda key: certificate(key, after=NOW + 60), "it is not valid yet"),
    (lambda key: certificate(key, kind=ssh.SSHCertificateType.USER), "a user certificate"),
    (lambda key: certificate(keys.Key(ed25519.Ed25519PrivateKey.generate())),
     "it certifies another key"),
    (lambda key: key.public().toString("openssh"), "a plain public key"),
    (lambda key: b"ssh-ed25519-cert-v01@openssh.com AAAA", "not an OpenSSH certificate"),
])
def test_unfit_certificates_are_refused_with_the_reason(tmp_path: Path, make: object,
                                                        why: str) -> None:
    key = host_key(tmp_path)
    with pytest.raises(BadKey, match=why):
        check_host_certificate(make(key), key, NOW)  # type: ignore[operator]


def test_an_unfit_certificate_is_a_warning_at_start_not_a_failure(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    key = host_key(tmp_path)
    keys_dir = str(tmp_path / "keys")
    assert present_host_certificate(keys_dir, key, NOW) is None  # no file: nothing said
    (tmp_path / "keys" / HOST_CERT_FILE).write_bytes(
        certificate(key, after=NOW - 7200, before=NOW - 60))
    assert present_host_certificate(keys_dir, key, NOW) is None
    (warning,) = [formatEvent(e) for e in logged if "not presented" in formatEvent(e)]
    assert "ssh_host_ed25519_key-cert.pub not presented: it has expired" in warning
    (tmp_path / "keys" / HOST_CERT_FILE).write_bytes(certificate(key))
    assert present_host_certificate(keys_dir, key, NOW) is not None
    assert any("presenting host certificate" in formatEvent(e) and "key ID 'hub'"
               in formatEvent(e) for e in logged)


def test_the_server_sends_the_certificate_and_signs_with_the_plain_key(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    clock.advance(NOW)
    hub = make_hub(tmp_path, clock)
    key = hub.keys.host_private[b"ssh-ed25519"]
    line = certificate(key)
    plain = start_factory(hub).buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    assert HOST_CERT_ALGORITHM not in plain.supportedPublicKeys  # no certificate: not offered
    hub.keys = evolve(hub.keys, host_certificate=check_host_certificate(line, key, NOW))
    factory = start_factory(hub)
    t = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    assert t.supportedPublicKeys[-1] == HOST_CERT_ALGORITHM
    public, private = t._getHostKeys(HOST_CERT_ALGORITHM)
    assert public.blob() == base64.b64decode(line.split()[1])
    signature = private.sign(b"exchange hash", signatureType=HOST_CERT_ALGORITHM)
    assert getNS(signature)[0] == b"ssh-ed25519"
    assert key.public().verify(signature, b"exchange hash")
    plain_public, _ = t._getHostKeys(b"ssh-ed25519")
    assert plain_public == key.public()
    # Once it has expired, new connections are not offered it.
    clock.advance(7200)
    assert HOST_CERT_ALGORITHM not in factory.buildProtocol(
        IPv4Address("TCP", "192.0.2.1", 40000)).supportedPublicKeys


def test_host_cert_cli_signs_shows_and_refuses(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(tmp_path)]
    main([*data, "callhome-password"])
    ca = tmp_path / "host_ca"
    ca.write_bytes(ca_text())
    os.chmod(ca, 0o600)
    assert main([*data, "host-cert"]) == 0
    assert "no host certificate" in capsys.readouterr().out
    assert main([*data, "host-cert", "--ca", str(ca), "--principals", "hub.example"]) == 0
    out = capsys.readouterr().out
    assert "key ID 'callhomehub:hub.example', principals hub.example" in out
    assert (tmp_path / "keys" / HOST_CERT_FILE).read_bytes().startswith(HOST_CERT_ALGORITHM)
    assert main([*data, "host-cert", "--ca", str(tmp_path / "missing")]) == 1
    assert "host-cert: cannot read" in capsys.readouterr().err
    (tmp_path / "junk").write_text("junk")
    assert main([*data, "host-cert", "--ca", str(tmp_path / "junk")]) == 1
    assert "not a usable CA private key" in capsys.readouterr().err
    assert main([*data, "audit"]) == 0
    assert "host-cert" in capsys.readouterr().out
