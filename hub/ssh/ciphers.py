"""
Cipher and MAC names, and an L{SSHCiphers} that speaks them.

L{ModernSSHCiphers} keeps Conch's L{SSHCiphers} shape (the transport reads
its C{outCipType}, C{encBlockSize} and friends) but protects packets through
the objects of L{hub.ssh.packet}, so AEAD ciphers and
encrypt-then-MAC fit where Conch only knew encrypt-and-MAC.
"""

from __future__ import annotations

from hashlib import sha256, sha512
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.conch.ssh.transport import SSHCiphers

from hub.ssh.packet import (
    AESGCMProtection,
    ChaCha20Poly1305Protection,
    EncryptAndMAC,
    EncryptThenMAC,
    HMACAlgorithm,
    PacketProtection,
)

CHACHA20_POLY1305 = b"chacha20-poly1305@openssh.com"
AES128_GCM = b"aes128-gcm@openssh.com"
AES256_GCM = b"aes256-gcm@openssh.com"
HMAC_SHA2_256_ETM = b"hmac-sha2-256-etm@openssh.com"
HMAC_SHA2_512_ETM = b"hmac-sha2-512-etm@openssh.com"

# What OpenSSH logs as the MAC of an AEAD cipher; never on the wire.
IMPLICIT_MAC = b"<implicit>"

# Ciphers that authenticate packets themselves: no MAC is negotiated.
AEAD_KEY_SIZES = {CHACHA20_POLY1305: 64, AES128_GCM: 16, AES256_GCM: 32}

ETM_MACS = {HMAC_SHA2_256_ETM: sha256, HMAC_SHA2_512_ETM: sha512}


def isAEAD(cipherName: bytes | None) -> bool:
    """
    Whether C{cipherName} carries its own authentication tag.
    """
    return cipherName in AEAD_KEY_SIZES


def chachaPolyAvailable() -> bool:
    """
    Whether the cryptography backend provides ChaCha20 and Poly1305.
    """
    try:
        Cipher(algorithms.ChaCha20(bytes(32), bytes(16)), mode=None).encryptor()
        Poly1305.generate_tag(bytes(32), b"")
    except UnsupportedAlgorithm:
        return False
    return True


def cipherBlockLimit(cipherName: bytes) -> int:
    """
    Bytes one key may protect before a rekey, as OpenSSH's
    C{ssh_set_newkeys} sets it: 2**32 blocks for ciphers with 16-byte
    blocks, 1 GiB for ChaCha20 (whose SSH block size is 8).
    """
    block_size = 8 if cipherName == CHACHA20_POLY1305 else 16
    if block_size >= 16:
        return (1 << (block_size * 2)) * block_size
    return 1 << 30


class ModernSSHCiphers(SSHCiphers):
    """
    L{SSHCiphers} with the OpenSSH AEAD ciphers and EtM MACs.

    @ivar outbound: how packets we send are protected.
    @ivar inbound: how packets we receive are checked.
    """

    macMap: dict[bytes, Any] = {**SSHCiphers.macMap, **ETM_MACS, IMPLICIT_MAC: None}

    outbound: PacketProtection
    inbound: PacketProtection

    def __init__(
        self, outCip: bytes, inCip: bytes, outMac: bytes, inMac: bytes
    ) -> None:
        super().__init__(
            outCip,
            inCip,
            IMPLICIT_MAC if isAEAD(outCip) else outMac,
            IMPLICIT_MAC if isAEAD(inCip) else inMac,
        )

    @classmethod
    def adopt(cls, ciphers: SSHCiphers) -> ModernSSHCiphers:
        """
        Take over a plain L{SSHCiphers} whose keys are already set (Conch
        makes the initial C{none} one itself in C{connectionMade}).
        """
        modern = cls(
            ciphers.outCipType, ciphers.inCipType, ciphers.outMACType, ciphers.inMACType
        )
        modern.outbound = EncryptAndMAC(
            ciphers.outCipType,
            ciphers.encBlockSize,
            ciphers.encrypt,
            bytes,
            _conchMAC(ciphers.outMAC),
        )
        modern.inbound = EncryptAndMAC(
            ciphers.inCipType,
            ciphers.decBlockSize,
            bytes,
            ciphers.decrypt,
            _conchMAC(ciphers.inMAC),
        )
        modern.encBlockSize = ciphers.encBlockSize or 8
        modern.decBlockSize = ciphers.decBlockSize or 8
        modern.verifyDigestSize = ciphers.verifyDigestSize
        return modern

    def setKeys(
        self,
        outIV: bytes,
        outKey: bytes,
        inIV: bytes,
        inKey: bytes,
        outInteg: bytes,
        inInteg: bytes,
    ) -> None:
        self.outbound = self._protection(
            self.outCipType, self.outMACType, outIV, outKey, outInteg
        )
        self.inbound = self._protection(
            self.inCipType, self.inMACType, inIV, inKey, inInteg
        )
        # The client transport reads encBlockSize to know keys are ready.
        self.encBlockSize = self.outbound.blockSize
        self.decBlockSize = self.inbound.blockSize

    def _protection(
        self, cipherName: bytes, macName: bytes, iv: bytes, key: bytes, integ: bytes
    ) -> PacketProtection:
        if cipherName == CHACHA20_POLY1305:
            return ChaCha20Poly1305Protection(cipherName, key[:64])
        if cipherName in (AES128_GCM, AES256_GCM):
            return AESGCMProtection(
                cipherName, key[: AEAD_KEY_SIZES[cipherName]], iv[:12]
            )
        cipher = None if cipherName == b"none" else self._getCipher(cipherName, iv, key)
        mac = None
        if self.macMap[macName] is not None:
            mac = HMACAlgorithm(self.macMap[macName], integ)
        if macName in ETM_MACS and cipher is not None and mac is not None:
            return EncryptThenMAC(cipherName, cipher, mac)
        return EncryptAndMAC.fromCipher(cipherName, cipher, mac)


def _conchMAC(params: Any) -> HMACAlgorithm | None:
    """
    An L{HMACAlgorithm} from Conch's C{_MACParams} tuple, if it has one.
    """
    if params[0] is None:
        return None
    return HMACAlgorithm(params[0], params.key)
