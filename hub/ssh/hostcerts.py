"""The hub's host certificate: its ed25519 host key signed by the organisation's host CA.

Clients with `@cert-authority * <CA key>` in known_hosts then trust the hub by
its CA, across host-key rotations. The certificate is the file
`DATA/keys/ssh_host_ed25519_key-cert.pub`, written by `callhomehub host-cert --ca`
(as `ssh-keygen -s CA -h` would) or placed there after signing elsewhere. At
start the hub checks it (a host certificate, for its current key, signed, within
its validity) and presents it as `ssh-ed25519-cert-v01@openssh.com`; one that is
not fit is logged and left out, never a reason to fail start-up.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Sequence
from typing import Any

from attrs import frozen
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.ssh import keys
from twisted.logger import Logger

from hub.errors import BadKey
from hub.ssh.keys import fingerprint

log = Logger()

HOST_CERT_FILE = "ssh_host_ed25519_key-cert.pub"
HOST_CERT_ALGORITHM = b"ssh-ed25519-cert-v01@openssh.com"
# The plain key type the certificate stands for, and signs the exchange hash with.
HOST_CERT_KEY_TYPE = b"ssh-ed25519"


@frozen
class HostCertificate:
    """A host certificate fit to present, and what the log says about it."""

    blob: bytes
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    ca_fingerprint: str

    def valid_at(self, now: float) -> bool:
        return self.valid_after <= now < self.valid_before

    def describe(self) -> str:
        def when(t: int) -> str:
            return "forever" if t >= 2**63 else time.strftime(
                "%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
        return (f"key ID {self.key_id!r}, principals {','.join(self.principals) or '(any)'}, "
                f"valid {when(self.valid_after)} to {when(self.valid_before)}, "
                f"CA {self.ca_fingerprint}")


def host_cert_path(keys_dir: str) -> str:
    return os.path.join(keys_dir, HOST_CERT_FILE)


def check_host_certificate(text: bytes, host_key: keys.Key, now: float) -> HostCertificate:
    """The certificate in `text` if the hub may present it for `host_key` at `now`;
    BadKey says why not."""
    try:
        cert = ssh.load_ssh_public_identity(text.strip())
    except (ValueError, TypeError) as e:
        raise BadKey(f"not an OpenSSH certificate: {e}") from None
    if not isinstance(cert, ssh.SSHCertificate):
        raise BadKey("a plain public key, not a certificate")
    if cert.type != ssh.SSHCertificateType.HOST:
        raise BadKey("a user certificate, not a host certificate (sign with ssh-keygen -h)")
    subject = cert.public_key().public_bytes(ssh.Encoding.OpenSSH, ssh.PublicFormat.OpenSSH)
    if subject.split()[:2] != host_key.public().toString("openssh").split()[:2]:
        raise BadKey("it certifies another key, not the hub's current ed25519 host key "
                     "(rotated? sign the new one: callhomehub host-cert --ca CA_KEY)")
    try:
        cert.verify_cert_signature()
    except InvalidSignature:
        raise BadKey("its CA signature does not verify") from None
    found = HostCertificate(
        blob=base64.b64decode(text.split()[1]),
        key_id=cert.key_id.decode("utf-8", "replace"),
        principals=tuple(p.decode("utf-8", "replace") for p in cert.valid_principals),
        valid_after=cert.valid_after, valid_before=cert.valid_before,
        ca_fingerprint=fingerprint(_blob_of(cert.signature_key())))
    if now >= found.valid_before:
        raise BadKey(f"it has expired ({found.describe()})")
    if now < found.valid_after:
        raise BadKey(f"it is not valid yet ({found.describe()})")
    return found


def _blob_of(public: object) -> bytes:
    line = public.public_bytes(  # type: ignore[attr-defined]
        ssh.Encoding.OpenSSH, ssh.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def load_host_certificate(keys_dir: str, host_key: keys.Key, now: float
                          ) -> HostCertificate | None:
    """The certificate file's certificate, None when there is no file; BadKey when
    there is one the hub must not present."""
    path = host_cert_path(keys_dir)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        text = f.read(64 * 1024)
    try:
        return check_host_certificate(text, host_key, now)
    except BadKey as e:
        raise BadKey(f"host certificate {path} not presented: {e}") from None


def sign_host_certificate(ca_text: bytes, host_key: keys.Key, principals: Sequence[str],
                          key_id: str, validity_days: float, now: float) -> bytes:
    """A host certificate line for `host_key`, signed by the CA private key in
    `ca_text` (OpenSSH or PEM format, without a passphrase)."""
    try:
        ca = serialization.load_ssh_private_key(ca_text, None)
    except ValueError:
        try:
            ca = serialization.load_pem_private_key(ca_text, None)  # type: ignore[assignment]
        except (ValueError, TypeError) as e:
            raise BadKey(f"not a usable CA private key ({e}); a passphrase-protected CA: "
                         "sign with ssh-keygen -s CA -h and put the certificate in "
                         f"keys/{HOST_CERT_FILE}") from None
    except TypeError as e:  # a passphrase is needed
        raise BadKey(f"the CA key needs a passphrase ({e}): sign with ssh-keygen -s CA -h "
                     f"and put the certificate in keys/{HOST_CERT_FILE}") from None
    public = serialization.load_ssh_public_key(host_key.public().toString("openssh"))
    builder = (ssh.SSHCertificateBuilder().public_key(public)  # type: ignore[arg-type]
               .serial(int(now)).type(ssh.SSHCertificateType.HOST)
               .key_id(key_id.encode()).valid_after(max(0, int(now) - 300))
               .valid_before(int(now + validity_days * 86400)))
    builder = (builder.valid_principals([p.encode() for p in principals]) if principals
               else builder.valid_for_all_principals())
    try:
        return builder.sign(ca).public_bytes() + b" callhomehub-host\n"  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise BadKey(f"cannot sign with that CA key: {e}") from None


@frozen
class CertifiedHostKey:
    """The public half Conch's key exchange sends: the certificate as the host key blob."""

    certificate: HostCertificate

    def blob(self) -> bytes:
        return self.certificate.blob


@frozen
class CertificateSigner:
    """The private half: signs the exchange hash with the plain key, as the
    certificate's algorithm requires (PROTOCOL.certkeys)."""

    key: keys.Key

    def sign(self, data: bytes, signatureType: bytes | None = None) -> bytes:
        return self.key.sign(data, signatureType=HOST_CERT_KEY_TYPE)


def present_host_certificate(keys_dir: str, host_key: keys.Key, now: float
                             ) -> HostCertificate | None:
    """At start: the certificate to present, logged; one unfit is logged and None."""
    try:
        found = load_host_certificate(keys_dir, host_key, now)
    except (BadKey, OSError) as e:
        log.warn("{error}", error=str(e))
        return None
    if found is not None:
        log.info("presenting host certificate {path}: {what}", path=host_cert_path(keys_dir),
                 what=found.describe())
    return found


class HostCertificateMixin:
    """Put before Conch's `SSHServerTransport`: when the client chose the
    certificate's algorithm, the key exchange sends the certificate
    (`factory.host_certificate`) as the host key and signs with the plain key.
    Conch's key-exchange handlers all take both halves from `_getHostKeys`,
    the one narrow place to answer with something other than the factory's keys."""

    factory: Any

    def _getHostKeys(self, keyAlg: bytes) -> tuple[Any, Any]:
        certificate = getattr(self.factory, "host_certificate", None)
        if keyAlg == HOST_CERT_ALGORITHM and certificate is not None:
            return (CertifiedHostKey(certificate),
                    CertificateSigner(self.factory.privateKeys[HOST_CERT_KEY_TYPE]))
        return super()._getHostKeys(keyAlg)  # type: ignore[misc,no-any-return]
