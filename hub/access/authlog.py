"""One log line per authentication outcome, in the words sshd uses.

Operators' tools (fail2ban's sshd filters, log searches, a security team's
habits) know these lines: `Accepted publickey for alice from 203.0.113.9 port
51234 ssh2: ED25519 SHA256:…`, `Failed password for cms from …`, `Invalid user
mallory from …`, `Failed publickey for alice from …`. contrib/fail2ban has a
filter for them.
"""

from __future__ import annotations

from twisted.conch.ssh import keys
from twisted.cred.error import UnauthorizedLogin

from hub.access import certs
from hub.ssh.keys import fingerprint

_KEY_TYPES = (
    ("ssh-ed25519", "ED25519"), ("sk-ssh-ed25519", "ED25519-SK"), ("ssh-rsa", "RSA"),
    ("rsa-sha2", "RSA"), ("ecdsa-sha2", "ECDSA"), ("sk-ecdsa", "ECDSA-SK"),
)


def _kind(algorithm: bytes) -> str:
    name = algorithm.decode("ascii", "replace")
    return next((label for prefix, label in _KEY_TYPES if name.startswith(prefix)),
                name.upper())


def key_text(algorithm: bytes, blob: bytes) -> str:
    """`ED25519 SHA256:…`, as sshd names a key; a certificate as
    `ED25519-CERT SHA256:… ID alice@corp (serial 7) CA ED25519 SHA256:…`."""
    if not certs.is_certificate(algorithm):
        return f"{_kind(algorithm)} {fingerprint(blob)}"
    try:
        cert = certs.parse_certificate(algorithm, blob)
        key, ca = keys.Key(cert.public_key()), keys.Key(cert.signature_key())
    except (UnauthorizedLogin, ValueError, keys.BadKeyError):
        return f"{_kind(algorithm)}-CERT (malformed)"
    return (f"{_kind(algorithm)}-CERT {fingerprint(key.blob())} ID "
            f"{who(cert.key_id)} (serial {cert.serial}) CA {_kind(ca.sshType())} "
            f"{fingerprint(ca.blob())}")


def who(user: bytes) -> str:
    # A login name is the peer's bytes: show them, never let them break the line.
    return user.decode("utf-8", "replace").encode("unicode_escape").decode("ascii")


def accepted(method: bytes, user: bytes, host: str, port: int, key: str | None) -> str:
    return (f"Accepted {method.decode()} for {who(user)} from {host} port {port} ssh2"
            + (f": {key}" if key else ""))


def failed(method: bytes, user: bytes, host: str, port: int, key: str | None,
           invalid: bool) -> str:
    return (f"Failed {method.decode()} for {'invalid user ' if invalid else ''}{who(user)} "
            f"from {host} port {port} ssh2" + (f": {key}" if key else ""))


def invalid_user(user: bytes, host: str, port: int) -> str:
    return f"Invalid user {who(user)} from {host} port {port}"
