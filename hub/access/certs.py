"""OpenSSH user certificates for operators, checked as sshd's `TrustedUserCAKeys` does.

A certificate signed by one of the trusted user CAs logs in as the operator its
principal names (every login-name form: `alice`, `alice:node`, `alice:node:port`),
within its validity window and, if it carries `source-address`, only from those
addresses. Host certificates, unknown critical options, certificates without
principals and revoked serials or key IDs are refused. Parsing and the CA's
signature are `cryptography`'s.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable
from typing import Any

from attrs import frozen
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import SSHCertificate, SSHCertificateType
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from hub.rules.logins import OperatorLogin, parse_login
from hub.ssh.keys import fingerprint
from hub.store.offthread import RegistryCalls
from hub.store.registry import Registry, User

log = Logger()

# SHA-1 RSA certificates (ssh-rsa-cert-v01) are off, as plain ssh-rsa is.
CERT_ALGORITHMS = frozenset({
    b"ssh-ed25519-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com",
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com",
    b"rsa-sha2-256-cert-v01@openssh.com",
    b"rsa-sha2-512-cert-v01@openssh.com",
})
# The name the key inside is known by (how `cryptography` reads the blob).
_BLOB_NAMES = {b"rsa-sha2-256-cert-v01@openssh.com": b"ssh-rsa-cert-v01@openssh.com",
               b"rsa-sha2-512-cert-v01@openssh.com": b"ssh-rsa-cert-v01@openssh.com"}
SUPPORTED_CRITICAL = frozenset({b"source-address"})


def is_certificate(algorithm: bytes) -> bool:
    return algorithm.endswith(b"-cert-v01@openssh.com")


def parse_certificate(algorithm: bytes, blob: bytes) -> SSHCertificate:
    """The certificate in a publickey request; UnauthorizedLogin if it is none."""
    name = _BLOB_NAMES.get(algorithm, algorithm)
    try:
        cert = serialization.load_ssh_public_identity(name + b" " + base64.b64encode(blob))
    except (ValueError, UnsupportedAlgorithm) as e:
        raise UnauthorizedLogin(f"malformed certificate: {e}") from None
    if not isinstance(cert, SSHCertificate):
        raise UnauthorizedLogin("malformed certificate: a plain key")
    return cert


def _key_blob(key: Any) -> bytes:
    return keys.Key(key).blob()


class ICertificateCredentials(Interface):
    """A publickey request made with a certificate, and where it came from."""

    username = Attribute("the login name (bytes)")
    algName = Attribute("the certificate algorithm (bytes)")
    blob = Attribute("the certificate (bytes)")
    sigData = Attribute("what the signature covers, or None for a probe")
    signature = Attribute("the signature, or None for a probe")
    source = Attribute("the client's address (str)")


@implementer(ICertificateCredentials)
@frozen
class CertificateCredentials:
    username: bytes
    algName: bytes
    blob: bytes
    sigData: bytes | None
    signature: bytes | None
    source: str


def check_certificate(cert: SSHCertificate, trusted: Iterable[bytes], principal: str,
                      source: str, now: float) -> None:
    """Why `cert` may not log in as `principal` from `source` now (UnauthorizedLogin)."""
    if cert.type is not SSHCertificateType.USER:
        raise UnauthorizedLogin("a host certificate is not a user certificate")
    ca = _key_blob(cert.signature_key())
    if ca not in set(trusted):
        raise UnauthorizedLogin(f"certificate signed by an untrusted CA {fingerprint(ca)}")
    try:
        cert.verify_cert_signature()
    except (InvalidSignature, ValueError):
        raise UnauthorizedLogin("certificate signature does not verify") from None
    if not cert.valid_after <= now < cert.valid_before:
        raise UnauthorizedLogin("certificate is not yet valid" if now < cert.valid_after
                                else "certificate has expired")
    unknown = set(cert.critical_options) - SUPPORTED_CRITICAL
    if unknown:
        raise UnauthorizedLogin("certificate has unsupported critical option(s) "
                                + ", ".join(sorted(o.decode("ascii", "replace")
                                                   for o in unknown)))
    allowed = cert.critical_options.get(b"source-address")
    if allowed is not None and not _source_allowed(allowed, source):
        raise UnauthorizedLogin(f"certificate is not valid from {source} "
                                f"(source-address {allowed.decode('ascii', 'replace')})")
    principals = [p.decode("utf-8", "replace").lower() for p in cert.valid_principals]
    if not principals:
        raise UnauthorizedLogin("certificate lists no principals")
    if principal.lower() not in principals:
        raise UnauthorizedLogin(f"certificate principals do not include {principal}")


def _source_allowed(allowed: bytes, source: str) -> bool:
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return False
    for net in allowed.decode("ascii", "replace").split(","):
        try:
            if address in ipaddress.ip_network(net.strip(), strict=False):
                return True
        except ValueError:
            continue  # a malformed entry allows nothing (sshd refuses the cert)
    return False


@implementer(ICredentialsChecker)
class CertificateChecker:
    """Operators logging in with a certificate from a trusted user CA."""

    credentialInterfaces = (ICertificateCredentials,)

    def __init__(self, calls: RegistryCalls, trusted: tuple[bytes, ...],
                 clock: IReactorTime) -> None:
        self._calls = calls  # the registry, read off the reactor
        self._trusted = trusted
        self._clock = clock

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self._check, credentials)

    def _check(self, c: CertificateCredentials) -> defer.Deferred[OperatorLogin]:
        from hub.access.auth import InvalidUser, operator  # auth imports this module

        if c.algName not in CERT_ALGORITHMS:
            raise UnauthorizedLogin(f"certificate algorithm {c.algName!r} not allowed")
        if not self._trusted:
            raise UnauthorizedLogin("no user CA is trusted ([operators] trusted_ca_keys)")
        name = c.username.decode("utf-8", "replace")
        try:
            login = parse_login(name)
        except UnauthorizedLogin:
            raise InvalidUser(f"no operator {name!r}") from None

        def found(user: User | None) -> defer.Deferred[OperatorLogin]:
            if user is None:
                raise InvalidUser(f"no operator {name!r}")
            cert = parse_certificate(c.algName, c.blob)
            check_certificate(cert, self._trusted, user.name, c.source, self._clock.seconds())
            key_id = cert.key_id.decode("utf-8", "replace")
            return self._calls.call(Registry.certificate_revoked, cert.serial,
                                    key_id).addCallback(
                lambda revoked: self._signed(c, login, user, cert, key_id, revoked))

        return self._calls.call(operator, login.user).addCallback(found)

    def _signed(self, c: CertificateCredentials, login: OperatorLogin, user: User,
                cert: SSHCertificate, key_id: str, revoked: bool) -> OperatorLogin:
        if revoked:
            raise UnauthorizedLogin(f"certificate serial {cert.serial} key ID {key_id!r} "
                                    "is revoked")
        if c.signature is None:
            raise ValidPublicKey()
        try:
            ok = keys.Key(cert.public_key()).verify(c.signature, c.sigData)
        except (keys.BadKeyError, ValueError) as e:
            raise UnauthorizedLogin(f"bad signature: {e}") from None
        if not ok:
            raise UnauthorizedLogin("signature does not verify")
        # The login stands on the user row and the CA; the certificate is checked at
        # login only, as sshd does (`cert revoke` refuses the next login).
        return OperatorLogin(user.name, login.node, login.port, identity=user.identity)
