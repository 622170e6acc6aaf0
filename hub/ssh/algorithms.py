"""
Algorithm preference lists for today's OpenSSH, weak ones left out.

Each is a tuple of SSH names, most preferred first, and is what
L{hub.ssh.modern.ModernTransportMixin} uses by default.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from attrs import frozen
from twisted.conch.ssh import _kex

from hub.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    HMAC_SHA2_256_ETM,
    HMAC_SHA2_512_ETM,
    chachaPolyAvailable,
)

_CONCH_KEX = set(_kex.getSupportedKeyExchanges())

# Key exchange, most preferred first; SHA-1 ones (group1, group14-sha1,
# group-exchange-sha1) are left out.  Neither Conch nor `cryptography` has
# sntrup761 (so no sntrup761x25519-sha512@openssh.com), nor group16/18-sha512.
# Group exchange needs a moduli file (SSHFactory drops it otherwise).
KEX_ALGORITHMS: tuple[bytes, ...] = tuple(
    name
    for name in (
        b"mlkem768x25519-sha256",
        b"curve25519-sha256",
        b"curve25519-sha256@libssh.org",
        b"ecdh-sha2-nistp256",
        b"ecdh-sha2-nistp384",
        b"ecdh-sha2-nistp521",
        b"diffie-hellman-group-exchange-sha256",
    )
    if name in _CONCH_KEX
)

# Conch's client does not implement the post-quantum hybrids yet.
CLIENT_KEX_ALGORITHMS: tuple[bytes, ...] = tuple(
    name for name in KEX_ALGORITHMS if not _kex.isPQHybrid(name)
)

# Host key signature algorithms: no ssh-rsa (SHA-1) and no ssh-dss.
HOST_KEY_ALGORITHMS: tuple[bytes, ...] = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)

# User-key signature algorithms the server announces in server-sig-algs.
USERAUTH_SIGNATURE_ALGORITHMS: tuple[bytes, ...] = (
    b"ssh-ed25519",
    b"sk-ssh-ed25519@openssh.com",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"sk-ecdsa-sha2-nistp256@openssh.com",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)

# Ciphers: AEAD first, then AES-CTR; no CBC, no 3DES.
CIPHERS: tuple[bytes, ...] = tuple(
    name
    for name in (
        CHACHA20_POLY1305,
        AES128_GCM,
        AES256_GCM,
        b"aes128-ctr",
        b"aes192-ctr",
        b"aes256-ctr",
    )
    if name != CHACHA20_POLY1305 or chachaPolyAvailable()
)


def aes_instructions(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AES instructions (x86's `aes` flag, ARMv8's `aes` feature),
    as /proc/cpuinfo tells; False where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, values = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return "aes" in values.split()
    return False


def client_ciphers(aes: bool) -> tuple[bytes, ...]:
    """The hub's order as an SSH client, whose order decides the cipher: AES-GCM first
    on a CPU with AES instructions (there it costs less per byte than ChaCha20: through
    the console gateway, where the hub's own session to the device carries every
    byte, 4.9 against 5.6 ms of hub CPU per MiB), else the server's order."""
    if not aes:
        return CIPHERS
    gcm = tuple(name for name in CIPHERS if name in (AES128_GCM, AES256_GCM))
    return gcm + tuple(name for name in CIPHERS if name not in gcm)


CLIENT_CIPHERS: tuple[bytes, ...] = client_ciphers(aes_instructions())

# MACs: encrypt-then-MAC first; no SHA-1, no MD5.
MACS: tuple[bytes, ...] = (
    HMAC_SHA2_256_ETM,
    HMAC_SHA2_512_ETM,
    b"hmac-sha2-256",
    b"hmac-sha2-512",
)

# Conch's "zlib" compresses before authentication; OpenSSH servers dropped it.
COMPRESSIONS: tuple[bytes, ...] = (b"none",)

# What ssh-audit flags on a server: ECDH on the NIST curves and ECDSA host keys
# (curves whose constants are unexplained, and ECDSA fails badly on a weak
# random nonce), and encrypt-and-MAC (the MAC over the plaintext).  The
# lists above keep them, for clients and for any Conch server; the hub's own
# server offers them only when `TransportPolicy.legacy_algorithms` is set, for
# old devices that have nothing better.
LEGACY_KEX_ALGORITHMS: tuple[bytes, ...] = (
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)
LEGACY_HOST_KEY_ALGORITHMS: tuple[bytes, ...] = (
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
)
LEGACY_MACS: tuple[bytes, ...] = (b"hmac-sha2-256", b"hmac-sha2-512")


@frozen
class TransportPolicy:
    """Which algorithms a server offers (the config file's `[transport]` section)."""

    # Also offer LEGACY_KEX_ALGORITHMS, LEGACY_HOST_KEY_ALGORITHMS and LEGACY_MACS.
    legacy_algorithms: bool = False

    def kex(self, names: Iterable[bytes]) -> list[bytes]:
        return self._offer(names, LEGACY_KEX_ALGORITHMS)

    def host_keys(self, names: Iterable[bytes]) -> list[bytes]:
        return self._offer(names, LEGACY_HOST_KEY_ALGORITHMS)

    def macs(self, names: Iterable[bytes]) -> list[bytes]:
        return self._offer(names, LEGACY_MACS)

    def _offer(self, names: Iterable[bytes], legacy: tuple[bytes, ...]) -> list[bytes]:
        return [n for n in names if self.legacy_algorithms or n not in legacy]


DEFAULT_POLICY = TransportPolicy()

# OpenSSH RekeyLimit semantics: a data amount (here 1 GiB, further capped
# per cipher) and a time (here one hour; OpenSSH's default is none).
REKEY_DATA_LIMIT = 1 << 30
REKEY_TIME_LIMIT = 3600.0
