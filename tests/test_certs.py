"""Operator certificates: each rule of `hub.access.certs` on certificates built with
`cryptography`, checked against a real registry."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    SSHCertificateBuilder,
    SSHCertificateType,
)
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.testing import MemoryReactorClock

from hub.access.auth import InvalidUser
from hub.access.authlog import key_text
from hub.access.certs import CertificateChecker, CertificateCredentials
from hub.app.config import trusted_ca_keys
from hub.errors import ConfigError
from hub.rules.logins import OperatorLogin
from hub.ssh.keys import fingerprint
from hub.store.offthread import InlineCalls
from hub.store.registry import Registry

NOW = 1_800_000_000.0
ALG = b"ssh-ed25519-cert-v01@openssh.com"


def blob_of(key: Any) -> bytes:
    return keys.Key(key).blob()


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.ca = ed25519.Ed25519PrivateKey.generate()
        self.user = ed25519.Ed25519PrivateKey.generate()
        self.registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: NOW)
        self.registry.add_user("alice", None, [], ["site-*"], "test")
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.checker = CertificateChecker(InlineCalls(self.registry),
                                          (blob_of(self.ca.public_key()),), self.clock)

    def cert(self, *, principals: tuple[bytes, ...] = (b"alice",), after: float = NOW - 60,
             before: float = NOW + 3600, kind: SSHCertificateType = SSHCertificateType.USER,
             critical: dict[bytes, bytes] | None = None, ca: Any = None, serial: int = 7,
             key_id: bytes = b"alice@corp") -> bytes:
        builder = (SSHCertificateBuilder().public_key(self.user.public_key()).serial(serial)
                   .key_id(key_id).type(kind).valid_after(int(after))
                   .valid_before(int(before)))
        builder = (builder.valid_principals(list(principals)) if principals
                   else builder.valid_for_all_principals())
        for name, value in (critical or {}).items():
            builder = builder.add_critical_option(name, value)
        cert = builder.sign(ca or self.ca)
        return base64.b64decode(cert.public_bytes().split()[1])

    def login(self, blob: bytes, user: bytes = b"alice", source: str = "192.0.2.7",
              signed: bool = True, signer: Any = None) -> Any:
        data = b"session data to sign"
        signature = keys.Key(signer or self.user).sign(data) if signed else None
        d = self.checker.requestAvatarId(CertificateCredentials(
            user, ALG, blob, data if signed else None, signature, source))
        failures: list[Any] = []
        d.addErrback(failures.append)
        if failures:
            raise failures[0].value
        return d.result


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_a_valid_certificate_logs_in_as_the_operator_its_principal_names(world: World) -> None:
    assert world.login(world.cert()) == OperatorLogin("alice")
    assert world.login(world.cert(), b"ALICE:site-a:2") == OperatorLogin("alice", "site-a", "2")
    with pytest.raises(ValidPublicKey):  # a probe is answered PK_OK
        world.login(world.cert(), signed=False)
    assert world.login(world.cert(critical={b"source-address": b"10.0.0.0/8,192.0.2.0/24"}))


@pytest.mark.parametrize(("change", "why"), [
    ({"before": NOW - 1, "after": NOW - 100}, "certificate has expired"),
    ({"after": NOW + 60}, "certificate is not yet valid"),
    ({"principals": (b"bob",)}, "certificate principals do not include alice"),
    ({"principals": ()}, "certificate lists no principals"),
    ({"kind": SSHCertificateType.HOST}, "a host certificate is not a user certificate"),
    ({"critical": {b"force-command": b"/bin/true"}},
     "certificate has unsupported critical option(s) force-command"),
    ({"critical": {b"source-address": b"10.0.0.0/8"}},
     "certificate is not valid from 192.0.2.7 (source-address 10.0.0.0/8)"),
])
def test_certificates_outside_their_terms_are_refused(world: World, change: dict[str, Any],
                                                      why: str) -> None:
    with pytest.raises(UnauthorizedLogin, match=None) as e:
        world.login(world.cert(**change))
    assert str(e.value) == why
    with pytest.raises(UnauthorizedLogin):  # a probe is refused too, not answered PK_OK
        world.login(world.cert(**change), signed=False)


def test_untrusted_ca_bad_signature_and_unknown_operator_are_refused(world: World) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(UnauthorizedLogin, match="untrusted CA"):
        world.login(world.cert(ca=other))
    with pytest.raises(UnauthorizedLogin, match="signature does not verify"):
        world.login(world.cert(), signer=other)
    tampered = bytearray(world.cert())
    tampered[-10] ^= 1  # inside the CA's signature
    with pytest.raises(UnauthorizedLogin, match="signature does not verify"):
        world.login(bytes(tampered))
    with pytest.raises(InvalidUser):
        world.login(world.cert(principals=(b"mallory",)), b"mallory")
    with pytest.raises(UnauthorizedLogin, match="malformed certificate"):
        world.login(b"\x00\x00\x00\x03abc")


def test_revoked_serials_and_key_ids_are_refused_and_audited(world: World) -> None:
    assert world.registry.revoke_certificate("cli:root", serial=7)
    assert not world.registry.revoke_certificate("cli:root", serial=7)
    with pytest.raises(UnauthorizedLogin, match="serial 7 key ID 'alice@corp' is revoked"):
        world.login(world.cert())
    assert world.login(world.cert(serial=8))
    world.registry.revoke_certificate("cli:root", key_id="alice@corp")
    with pytest.raises(UnauthorizedLogin, match="is revoked"):
        world.login(world.cert(serial=8))
    assert [(e.action, e.target) for e in world.registry.audit_log()
            if e.action == "cert-revoke"] == [("cert-revoke", "serial 7"),
                                              ("cert-revoke", "key ID alice@corp")]


def test_the_log_names_a_certificate_as_sshd_does(world: World) -> None:
    text = key_text(ALG, world.cert())
    user_fp = fingerprint(blob_of(world.user.public_key()))
    ca_fp = fingerprint(blob_of(world.ca.public_key()))
    assert user_fp.startswith("SHA256:") and not user_fp.endswith("=")
    assert text == f"ED25519-CERT {user_fp} ID alice@corp (serial 7) CA ED25519 {ca_fp}"


def test_trusted_ca_keys_take_lines_and_files_and_name_a_bad_entry(tmp_path: Path) -> None:
    ca = ed25519.Ed25519PrivateKey.generate().public_key()
    line = ca.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    (tmp_path / "cas.pub").write_text(f"# our CAs\n{line} ca@corp\n\n")
    assert trusted_ca_keys([line], "") == (blob_of(ca),)
    assert trusted_ca_keys(["cas.pub"], str(tmp_path)) == (blob_of(ca),)
    with pytest.raises(ConfigError, match=r"trusted_ca_keys\[1\]: cannot read"):
        trusted_ca_keys([line, "nosuch.pub"], str(tmp_path))
    with pytest.raises(ConfigError, match=r"trusted_ca_keys\[0\]: not a public key"):
        trusted_ca_keys(["ssh-ed25519 AAAAnotbase64"], "")
