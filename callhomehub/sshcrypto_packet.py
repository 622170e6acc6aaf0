"""
SSH binary packet protection, one object per direction, with no I/O.

Each class here turns a payload into the bytes that go on the wire
(L{seal}) and takes them apart again (L{open}), for one way of protecting
packets: Conch's classic encrypt-and-MAC, OpenSSH's encrypt-then-MAC
(C{*-etm@openssh.com}), AES-GCM as OpenSSH does it (C{aes*-gcm@openssh.com},
RFC 5647 with OpenSSH's names) and C{chacha20-poly1305@openssh.com}.

L{open} is called with everything received so far; it answers L{None} while
a whole packet has not arrived, or the payload and how many bytes it used.
A bad packet raises L{PacketError}, which carries the SSH disconnect reason.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

# RFC 4253 section 11.1 reason codes used here.
DISCONNECT_PROTOCOL_ERROR = 2
DISCONNECT_MAC_ERROR = 5

# Conch's limit on packet_length (OpenSSH uses 256 KiB).
MAX_PACKET_LENGTH = 1024 * 1024

_UINT32 = struct.Struct("!L")


class PacketError(Exception):
    """
    A received packet is malformed or fails authentication; the connection
    must be dropped with C{reason} (an SSH disconnect reason code).
    """

    def __init__(self, reason: int, description: bytes) -> None:
        super().__init__(reason, description)
        self.reason = reason
        self.description = description


class PacketProtection(Protocol):
    """
    How packets are framed and protected in one direction.

    @ivar blockSize: the padding block size (at least 8).
    @ivar name: the cipher name, for logs.
    """

    blockSize: int
    name: bytes

    def seal(self, seqnr: int, payload: bytes) -> bytes:
        """
        Frame, pad and protect C{payload} as packet number C{seqnr}.
        """

    def open(self, seqnr: int, buf: bytes) -> tuple[bytes, int] | None:
        """
        Take the packet numbered C{seqnr} from the front of C{buf}.
        """


def padLength(blockSize: int, payloadLength: int, lengthInClear: bool) -> int:
    """
    Padding for a payload, as OpenSSH computes it: the padded part must be a
    multiple of the block size, and the 4-byte length field does not count
    when it is kept out of the encrypted stream (EtM, GCM, ChaCha20).
    """
    size = 5 + payloadLength - (4 if lengthInClear else 0)
    pad = blockSize - size % blockSize
    if pad < 4:
        pad += blockSize
    return pad


def frameBody(blockSize: int, payload: bytes, lengthInClear: bool) -> bytes:
    """
    C{padding_length || payload || random padding}, the part of the packet
    after the length field.
    """
    pad = padLength(blockSize, len(payload), lengthInClear)
    return bytes((pad,)) + payload + os.urandom(pad)


def unframeBody(body: bytes) -> bytes:
    """
    The payload from C{padding_length || payload || padding}.
    """
    pad = body[0]
    if pad < 4 or pad + 1 >= len(body):
        raise PacketError(DISCONNECT_PROTOCOL_ERROR, b"bad padding length")
    return body[1 : len(body) - pad]


def checkLength(packet_length: int, blockSize: int, lengthInClear: bool) -> None:
    """
    Refuse a packet_length that is out of range or not block-aligned.
    """
    if packet_length < 5 or packet_length > MAX_PACKET_LENGTH:
        raise PacketError(
            DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % (packet_length,)
        )
    aligned = packet_length if lengthInClear else packet_length + 4
    if aligned % blockSize:
        raise PacketError(
            DISCONNECT_PROTOCOL_ERROR, b"bad packet mod (%d)" % (packet_length,)
        )


class HMACAlgorithm:
    """
    An SSH C{hmac-*} MAC: HMAC over C{uint32 seqnr || data}.
    """

    def __init__(self, digestmod: Callable[..., Any], key: bytes) -> None:
        self._digestmod = digestmod
        self.size: int = digestmod().digest_size
        # SSH uses exactly digest-size keys (RFC 4253 section 7.2).
        self._key = key[: self.size]

    def mac(self, seqnr: int, data: bytes) -> bytes:
        return hmac.new(self._key, _UINT32.pack(seqnr) + data, self._digestmod).digest()

    def verify(self, seqnr: int, data: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(seqnr, data), tag)


class EncryptAndMAC:
    """
    RFC 4253 packets, as Conch sends them: the whole packet encrypted with a
    block or stream cipher, an optional MAC over the plaintext.  Built by
    L{fromCipher}; with no cipher this is the C{none} cipher of the first
    key exchange.
    """

    def __init__(
        self,
        name: bytes,
        blockSize: int,
        encrypt: Callable[[bytes], bytes],
        decrypt: Callable[[bytes], bytes],
        mac: HMACAlgorithm | None,
    ) -> None:
        self.name = name
        self.blockSize = max(8, blockSize)
        self._enc = encrypt
        self._dec = decrypt
        self._mac = mac
        self._macSize = mac.size if mac else 0
        self._first: bytes | None = None

    @classmethod
    def fromCipher(
        cls, name: bytes, cipher: Cipher[Any] | None, mac: HMACAlgorithm | None
    ) -> EncryptAndMAC:
        if cipher is None:
            return cls(name, 8, bytes, bytes, mac)
        return cls(
            name,
            cipher.algorithm.block_size // 8,  # type: ignore[attr-defined]
            cipher.encryptor().update,
            cipher.decryptor().update,
            mac,
        )

    def seal(self, seqnr: int, payload: bytes) -> bytes:
        body = frameBody(self.blockSize, payload, False)
        packet = _UINT32.pack(len(body)) + body
        tag = self._mac.mac(seqnr, packet) if self._mac else b""
        return self._enc(packet) + tag

    def open(self, seqnr: int, buf: bytes) -> tuple[bytes, int] | None:
        bs = self.blockSize
        if self._first is None:
            if len(buf) < bs:
                return None
            self._first = self._dec(buf[:bs])
        (packet_length,) = _UINT32.unpack(self._first[:4])
        checkLength(packet_length, bs, False)
        need = 4 + packet_length + self._macSize
        if len(buf) < need:
            return None
        packet = self._first + self._dec(buf[bs : 4 + packet_length])
        self._first = None
        if self._mac and not self._mac.verify(
            seqnr, packet, buf[4 + packet_length : need]
        ):
            raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC")
        return unframeBody(packet[4:]), need


class EncryptThenMAC:
    """
    OpenSSH's C{*-etm@openssh.com} MACs: the length travels in clear, the
    rest is encrypted, and the MAC covers C{seqnr || length || ciphertext},
    so nothing is decrypted before it is authenticated.
    """

    def __init__(self, name: bytes, cipher: Cipher[Any], mac: HMACAlgorithm) -> None:
        self.name = name
        self._mac = mac
        self.blockSize = max(8, cipher.algorithm.block_size // 8)  # type: ignore[attr-defined]
        self._enc = cipher.encryptor().update
        self._dec = cipher.decryptor().update

    def seal(self, seqnr: int, payload: bytes) -> bytes:
        body = frameBody(self.blockSize, payload, True)
        data = _UINT32.pack(len(body)) + self._enc(body)
        return data + self._mac.mac(seqnr, data)

    def open(self, seqnr: int, buf: bytes) -> tuple[bytes, int] | None:
        if len(buf) < 4:
            return None
        (packet_length,) = _UINT32.unpack(buf[:4])
        checkLength(packet_length, self.blockSize, True)
        need = 4 + packet_length + self._mac.size
        if len(buf) < need:
            return None
        data = buf[: 4 + packet_length]
        if not self._mac.verify(seqnr, data, buf[4 + packet_length : need]):
            raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC")
        return unframeBody(self._dec(data[4:])), need


class AESGCMProtection:
    """
    C{aes128-gcm@openssh.com} / C{aes256-gcm@openssh.com}: RFC 5647 as
    OpenSSH implements it.  The length is in clear and is the additional
    authenticated data; the 12-byte nonce is a 4-byte fixed field and an
    8-byte invocation counter, both from the key exchange's IV, and the
    counter goes up by one per packet; a 16-byte tag replaces the MAC.
    """

    blockSize = 16
    TAG_SIZE = 16

    def __init__(self, name: bytes, key: bytes, iv: bytes) -> None:
        self.name = name
        self._aead = AESGCM(key)
        self.fixed = iv[:4]
        self.invocationCounter = int.from_bytes(iv[4:12], "big")

    def _nonce(self) -> bytes:
        return self.fixed + self.invocationCounter.to_bytes(8, "big")

    def _advance(self) -> None:
        self.invocationCounter = (self.invocationCounter + 1) % (1 << 64)

    def seal(self, seqnr: int, payload: bytes) -> bytes:
        body = frameBody(self.blockSize, payload, True)
        aad = _UINT32.pack(len(body))
        sealed = self._aead.encrypt(self._nonce(), body, aad)
        self._advance()
        return aad + sealed

    def open(self, seqnr: int, buf: bytes) -> tuple[bytes, int] | None:
        if len(buf) < 4:
            return None
        (packet_length,) = _UINT32.unpack(buf[:4])
        checkLength(packet_length, self.blockSize, True)
        need = 4 + packet_length + self.TAG_SIZE
        if len(buf) < need:
            return None
        try:
            body = self._aead.decrypt(self._nonce(), buf[4:need], buf[:4])
        except InvalidTag:
            raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC") from None
        self._advance()
        return unframeBody(body), need


def chacha20Stream(key: bytes, counter: int, nonce: int, data: bytes) -> bytes:
    """
    Original (D. J. Bernstein) ChaCha20 with a 64-bit block counter and a
    64-bit nonce, as OpenSSH uses it.  cryptography's 16-byte ChaCha20
    "nonce" is the cipher's last four state words: they are the 64-bit
    little-endian counter followed by the 64-bit nonce, which OpenSSH fills
    with the big-endian sequence number.
    """
    iv = counter.to_bytes(8, "little") + nonce.to_bytes(8, "big")
    return Cipher(algorithms.ChaCha20(key, iv), mode=None).encryptor().update(data)


class ChaCha20Poly1305Protection:
    """
    C{chacha20-poly1305@openssh.com} (OpenSSH PROTOCOL.chacha20poly1305).

    The 64 bytes of key material hold K_2 (first 32 bytes, for the packet
    body and the Poly1305 key) and K_1 (last 32, for the length).  The
    sequence number is the nonce.  The length is encrypted with K_1 at block
    counter 0; the Poly1305 key is the first 32 bytes of K_2's keystream at
    block 0; the body is encrypted with K_2 from block 1; the tag covers the
    encrypted length and the encrypted body.
    """

    blockSize = 8
    TAG_SIZE = 16
    KEY_SIZE = 64

    def __init__(self, name: bytes, key: bytes) -> None:
        if len(key) < self.KEY_SIZE:
            raise ValueError("chacha20-poly1305 needs 64 bytes of key")
        self.name = name
        self._mainKey = key[:32]
        self._headerKey = key[32:64]
        self._pending: tuple[int, int] | None = None

    def sealBody(self, seqnr: int, body: bytes) -> bytes:
        """
        Protect an already framed and padded body (exposed for known-answer
        tests, which need fixed padding).
        """
        length = chacha20Stream(self._headerKey, 0, seqnr, _UINT32.pack(len(body)))
        encrypted = length + chacha20Stream(self._mainKey, 1, seqnr, body)
        return encrypted + Poly1305.generate_tag(self._polyKey(seqnr), encrypted)

    def _polyKey(self, seqnr: int) -> bytes:
        return chacha20Stream(self._mainKey, 0, seqnr, bytes(32))

    def seal(self, seqnr: int, payload: bytes) -> bytes:
        return self.sealBody(seqnr, frameBody(self.blockSize, payload, True))

    def open(self, seqnr: int, buf: bytes) -> tuple[bytes, int] | None:
        if len(buf) < 4:
            return None
        if self._pending is None or self._pending[0] != seqnr:
            clear = chacha20Stream(self._headerKey, 0, seqnr, buf[:4])
            (packet_length,) = _UINT32.unpack(clear)
            checkLength(packet_length, self.blockSize, True)
            self._pending = (seqnr, packet_length)
        packet_length = self._pending[1]
        need = 4 + packet_length + self.TAG_SIZE
        if len(buf) < need:
            return None
        self._pending = None
        encrypted = buf[: 4 + packet_length]
        try:
            Poly1305.verify_tag(
                self._polyKey(seqnr), encrypted, buf[4 + packet_length : need]
            )
        except InvalidSignature:
            raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC") from None
        body = chacha20Stream(self._mainKey, 1, seqnr, encrypted[4:])
        return unframeBody(body), need
