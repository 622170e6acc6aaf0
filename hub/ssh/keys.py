"""Host keys and the management identity, created on first start.

Private key files are created with mode 0600 inside a 0700 directory, written
to a temporary name and renamed, so a hub killed half-way never leaves a
truncated key behind. Public keys and fingerprints are helpers for the rest.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import frozen
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.ssh import keys

from hub.errors import BadKey

if TYPE_CHECKING:
    from hub.ssh.hostcerts import HostCertificate

HOST_KEY_FILES: dict[str, Callable[[], object]] = {
    "ssh_host_ed25519_key": ed25519.Ed25519PrivateKey.generate,
    "ssh_host_rsa_key": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    "ssh_host_ecdsa_key": lambda: ec.generate_private_key(ec.SECP256R1()),
}
MGMT_KEY_FILE = "hub_mgmt_ed25519_key"


@frozen
class HubKeys:
    """The hub's host keys by key type, and its management identity."""

    host_private: dict[bytes, keys.Key]
    host_public: dict[bytes, keys.Key]
    mgmt: keys.Key
    # The ed25519 host key's certificate (hub.ssh.hostcerts), when one is presented.
    host_certificate: HostCertificate | None = None

    @property
    def mgmt_public_line(self) -> str:
        """The management key as an authorized_keys line."""
        return self.mgmt.public().toString("openssh", comment=b"callhomehub-mgmt").decode() + "\n"


def write_private(path: str, key: keys.Key, comment: str) -> None:
    """Write `key` in OpenSSH format with mode 0600, atomically, plus `path.pub`."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh", subtype="v1", comment=comment.encode()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    pub_tmp = f"{path}.pub.tmp{os.getpid()}"
    with open(pub_tmp, "wb") as f:
        f.write(key.public().toString("openssh", comment=comment.encode()) + b"\n")
    os.replace(pub_tmp, path + ".pub")


def _load_or_create(path: str, generate: Callable[[], object], comment: str) -> keys.Key:
    if not os.path.exists(path):
        write_private(path, keys.Key(generate()), comment)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        # sshd refuses group/world-readable host keys; we tighten instead of refusing.
        os.chmod(path, 0o600)
    try:
        return keys.Key.fromFile(path)
    except (keys.BadKeyError, ValueError) as e:
        raise BadKey(f"key file {path} is not a usable private key: {e}") from None


def load_hub_keys(keys_dir: str) -> HubKeys:
    """Load the host keys and management key, creating any that are missing."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    private: dict[bytes, keys.Key] = {}
    for filename, generate in HOST_KEY_FILES.items():
        key = _load_or_create(os.path.join(keys_dir, filename), generate, "callhomehub-host")
        private[key.sshType()] = key
    mgmt = _load_or_create(
        os.path.join(keys_dir, MGMT_KEY_FILE), ed25519.Ed25519PrivateKey.generate,
        "callhomehub-mgmt",
    )
    return HubKeys(private, {t: k.public() for t, k in private.items()}, mgmt)


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob (`SHA256:...`)."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


@frozen
class PublicKeyLine:
    blob: bytes
    comment: str
    fingerprint: str


def parse_public_key(text: bytes) -> PublicKeyLine:
    """Parse one OpenSSH public key line (as in id_ed25519.pub). BadKey says why not."""
    if b"PRIVATE KEY" in text:
        raise BadKey("that is a private key; send the .pub file")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(b"#")]
    if not lines:
        raise BadKey("no public key given on standard input")
    if len(lines) > 1:
        raise BadKey(f"expected exactly one public key line, got {len(lines)}")
    line = lines[0]
    try:
        key = keys.Key.fromString(line)
    except Exception:  # Conch's parser raises struct, index, type... errors on junk
        # Its messages quote the input as a bytes repr: say what is expected instead.
        raise BadKey("not an OpenSSH public key: expected one line 'TYPE BASE64 [COMMENT]', "
                     "as in id_ed25519.pub") from None
    if not key.isPublic():
        raise BadKey("that is a private key; send the .pub file")
    if key.type() == "DSA":
        raise BadKey("DSA keys are not accepted; use ed25519, ECDSA or RSA")
    if key.type() == "RSA" and key.size() < 2048:
        raise BadKey(f"RSA key of {key.size()} bits is too weak; use at least 2048")
    parts = line.split(None, 2)
    comment = parts[2].decode("utf-8", "replace") if len(parts) > 2 else ""
    blob = key.blob()
    return PublicKeyLine(blob, comment, fingerprint(blob))


PEER_KEY_FILE = "hub_peer_ed25519_key"


def load_peer_key(keys_dir: str) -> keys.Key:
    """The hub's own peer key (hub-to-hub logins and the peer listener's host
    key), made on first start. Each hub has its own: it is not copied with the
    rest of keys/ (its public half is published in the registry)."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    return _load_or_create(os.path.join(keys_dir, PEER_KEY_FILE),
                           ed25519.Ed25519PrivateKey.generate, "callhomehub-peer")
