"""The hub's user CA: short-lived OpenSSH user certificates for its logins to devices.

`callhomehub ca init` creates the CA key; a device that trusts it (sshd's
`TrustedUserCAKeys`, or a `cert-authority` line in authorized_keys) lets the hub
in with a certificate for its management key, issued for one login: valid from
a minute ago (clock skew) for five minutes, one principal (the device user), key
ID `callhomehub:NODE`, a serial that only grows. `cryptography` builds and signs
it; Conch only ever sees the plain keys.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

from attrs import define, field, frozen
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.ssh import keys
from twisted.logger import Logger

from hub.errors import BadKey
from hub.ssh.keys import fingerprint, write_private

log = Logger()

USER_CA_FILE = "hub_user_ca_ed25519_key"
CERT_SUFFIX = b"-cert-v01@openssh.com"
# Before now: the device's clock may lag the hub's; after: one login's worth.
VALID_BEFORE_NOW = 60
VALID_AFTER_NOW = 300
# What a session on the device may ask for (ssh-keygen's defaults, minus X11 and agent).
EXTENSIONS = (b"permit-port-forwarding", b"permit-pty", b"permit-user-rc")


@frozen
class UserCertificate:
    """A certificate for a plain key, offered in place of it; the plain key signs."""

    certificate: bytes      # the certificate blob as sent in a publickey request
    algorithm: bytes        # ssh-ed25519-cert-v01@openssh.com
    key_id: str
    serial: int

    def blob(self) -> bytes:
        return self.certificate

    def sshType(self) -> bytes:  # Conch's name, as keys.Key has it
        return self.algorithm

    def signature_type(self) -> bytes:
        """The plain key's signature algorithm, which signs for the certificate."""
        return self.algorithm[:-len(CERT_SUFFIX)]


def user_ca_path(keys_dir: str) -> str:
    return os.path.join(keys_dir, USER_CA_FILE)


def create_user_ca(keys_dir: str, force: bool = False) -> keys.Key:
    """Create the hub's user CA key (0600 in the 0700 keys directory); an existing
    one is kept unless `force` (every device trusting it would have to be told)."""
    path = user_ca_path(keys_dir)
    if os.path.exists(path) and not force:
        raise BadKey(f"the hub user CA already exists ({path}); devices trust it. "
                     "Pass --force to replace it")
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    write_private(path, key, "callhomehub-user-ca")
    return key


def load_user_ca(keys_dir: str) -> keys.Key | None:
    """The hub's user CA key, or None when `ca init` has not made one."""
    path = user_ca_path(keys_dir)
    if not os.path.exists(path):
        return None
    try:
        return keys.Key.fromFile(path)
    except (keys.BadKeyError, ValueError) as e:
        raise BadKey(f"the hub user CA {path} is not a usable private key: {e}") from None


def ca_public_line(ca: keys.Key) -> str:
    """The CA as a public-key line (for TrustedUserCAKeys)."""
    return ca.public().toString("openssh", comment=b"callhomehub-user-ca").decode()


def authorized_keys_line(ca: keys.Key, user: str) -> str:
    """The authorized_keys line that trusts the CA for `user` only."""
    return f'cert-authority,principals="{user}" {ca_public_line(ca)}'


def issue(ca: keys.Key, subject: keys.Key, principal: str, key_id: str, serial: int,
          now: float) -> UserCertificate:
    """Sign a user certificate for `subject`'s public key."""
    signer = serialization.load_ssh_private_key(ca.toString("openssh", subtype="v1"), None)
    public = serialization.load_ssh_public_key(subject.public().toString("openssh"))
    assert isinstance(signer, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    builder = (ssh.SSHCertificateBuilder().public_key(public).serial(serial)
               .type(ssh.SSHCertificateType.USER).key_id(key_id.encode())
               .valid_principals([principal.encode()])
               .valid_after(max(0, int(now) - VALID_BEFORE_NOW))
               .valid_before(int(now) + VALID_AFTER_NOW))
    for name in EXTENSIONS:
        builder = builder.add_extension(name, b"")
    algorithm, text = builder.sign(signer).public_bytes().split()[:2]
    return UserCertificate(base64.b64decode(text), algorithm, key_id, serial)


@define(eq=False)
class HubUserCA:
    """Issues certificates with the CA key file as it is now: `ca init --force`
    takes effect at the next login, without a restart."""

    keys_dir: str
    now: Callable[[], float]
    _last_serial: int = 0
    _warned: bool = field(default=False, init=False)

    def certify(self, subject: keys.Key, user: str, node: str) -> UserCertificate | None:
        """A certificate for one login as `user` on `node`, or None without a CA."""
        try:
            ca = load_user_ca(self.keys_dir)
        except BadKey as e:
            log.error("{error}: logging in with the management key only", error=str(e))
            return None
        if ca is None:
            if not self._warned:
                self._warned = True
                log.warn("[devices] login = \"ca\" but the hub has no user CA (run "
                         "callhomehub ca init): logging in with the management key only")
            return None
        now = self.now()
        # Microseconds since the epoch, and never one issued before: increasing
        # across restarts too while the clock does not go back.
        self._last_serial = max(self._last_serial + 1, int(now * 1_000_000))
        return issue(ca, subject, user, f"callhomehub:{node}", self._last_serial, now)

    def fingerprint(self) -> str | None:
        ca = load_user_ca(self.keys_dir)
        return None if ca is None else fingerprint(ca.public().blob())


@define(eq=False)
class DeviceIdentity:
    """What the hub logs in to devices with: its management key and, with
    `[devices] login = "ca"`, a certificate for it first. `key_fallback`: after a
    refused certificate, offer the plain key (off to prove a certificate login)."""

    key: keys.Key
    ca: HubUserCA | None = None
    key_fallback: bool = True

    def offers(self, user: str, node: str) -> list[keys.Key | UserCertificate]:
        """What to offer the device, in order (public parts only)."""
        certificate = None if self.ca is None else self.ca.certify(self.key, user, node)
        if certificate is None:
            return [self.key.public()]
        return [certificate] + ([self.key.public()] if self.key_fallback else [])
