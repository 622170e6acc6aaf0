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

The transport uses the zero-copy forms: L{sealInto} frames a payload given
in two parts (a small head and the bulk data, e.g. a channel's bytes) into
the object's own buffer with one copy, encrypts from there into a second
buffer (or into C{out}, e.g. a batch of packets written together) and
returns a view of the wire bytes; L{openFrom} authenticates and
decrypts a packet found at an offset of the receive buffer into the object's
own buffer and returns a view of the payload.  The views stay valid until
the next call in the same direction.

chacha20-poly1305 and AES-CTR with an EtM HMAC seal and open each packet
with one call of C{hub.ssh._packets} (OpenSSL driven from C) when it was
built; cryptography is their twin, and does everything else.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305
from twisted.logger import Logger

from hub.ssh.buffers import Bytes, PaddingPool
from hub.ssh.framing import (
    DISCONNECT_MAC_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MAX_PACKET_LENGTH,
    Framed,
    HMACAlgorithm,
    PacketError,
    PacketProtection,
    checkLength,
    frameInto,
    padLength,
    unframeBody,
)

__all__ = [
    "DISCONNECT_MAC_ERROR",
    "DISCONNECT_PROTOCOL_ERROR",
    "MAX_PACKET_LENGTH",
    "AESGCMProtection",
    "ChaCha20Poly1305Protection",
    "EncryptAndMAC",
    "EncryptThenMAC",
    "HMACAlgorithm",
    "PacketError",
    "PacketProtection",
    "checkLength",
    "frameInto",
    "padLength",
    "unframeBody",
]

try:
    from hub.ssh._packets import ChaChaPoly as _CChaChaPoly
    from hub.ssh._packets import EtM as _CEtM
except ImportError:  # not built (setup.py): cryptography seals and opens every packet
    _CChaChaPoly = _CEtM = None

_log = Logger()
_NATIVE_REFUSED: set[str] = set()


def _native(factory: Callable[..., Any] | None, *args: object) -> Any:
    """
    The C object of C{hub.ssh._packets} that C{factory} makes from C{args},
    or L{None} (cryptography then protects the packets): the extension is
    not built, or the system's OpenSSL refuses (a FIPS-only configuration
    has no ChaCha20; said once per kind in the log).
    """
    if factory is None:
        return None
    try:
        return factory(*args)
    except RuntimeError as e:
        name = getattr(factory, "__name__", "?")
        if name not in _NATIVE_REFUSED:
            _NATIVE_REFUSED.add(name)
            _log.warn("SSH packets: the C path for {kind} is not available ({why}); "
                      "cryptography protects them instead", kind=name, why=str(e))
        return None

_UINT32 = struct.Struct("!L")
# The padding_length byte for each possible padding.
_PAD_LENGTH = [bytes((n,)) for n in range(256)]


class EncryptAndMAC:
    """
    RFC 4253 packets, as Conch sends them: the whole packet encrypted with a
    block or stream cipher, an optional MAC over the plaintext.  Built by
    L{fromCipher}; with no cipher this is the C{none} cipher of the first
    key exchange.  Rare after the first key exchange (OpenSSH prefers AEAD
    or EtM), so it keeps the simple copying code.
    """

    def __init__(
        self,
        name: bytes,
        blockSize: int,
        encrypt: Callable[[bytes], bytes],
        decrypt: Callable[[Bytes], bytes],
        mac: HMACAlgorithm | None,
    ) -> None:
        self.name = name
        self.blockSize = max(8, blockSize)
        self._enc = encrypt
        self._dec = decrypt
        self._mac = mac
        self._macSize = mac.size if mac else 0
        self._first: bytes | None = None
        self._padding = PaddingPool()
        self.wanted = 0  # see PacketProtection; unknown here

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
        pad = padLength(self.blockSize, len(payload), False)
        packet = (
            _UINT32.pack(1 + len(payload) + pad)
            + bytes((pad,))
            + payload
            + self._padding.take(pad)
        )
        tag = self._mac.mac(seqnr, packet) if self._mac else b""
        return self._enc(packet) + tag

    def sealInto(
        self, seqnr: int, head: bytes, data: Bytes, out: memoryview | None = None
    ) -> memoryview:
        sealed = self.seal(seqnr, head + bytes(data))
        if out is None or len(sealed) > len(out):
            return memoryview(sealed)
        # Into the room given (an output batch's): the clear packets of the
        # first key exchange go out with what follows them.
        out[: len(sealed)] = sealed
        return out[: len(sealed)]

    def open(self, seqnr: int, buf: Bytes) -> tuple[bytes, int] | None:
        bs = self.blockSize
        if self._first is None:
            if len(buf) < bs:
                return None
            self._first = bytes(self._dec(buf[:bs]))
        (packet_length,) = _UINT32.unpack(self._first[:4])
        checkLength(packet_length, bs, False)
        need = 4 + packet_length + self._macSize
        if len(buf) < need:
            return None
        packet = self._first + bytes(self._dec(buf[bs : 4 + packet_length]))
        self._first = None
        if self._mac and not self._mac.verify(
            seqnr, packet, buf[4 + packet_length : need]
        ):
            raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC")
        return unframeBody(memoryview(packet)[4:]).tobytes(), need

    def openFrom(self, seqnr: int, buf: Bytes, pos: int) -> tuple[memoryview, int] | None:
        with memoryview(buf) as view:
            opened = self.open(seqnr, view[pos:])
        if opened is None:
            return None
        return memoryview(opened[0]), opened[1]


class EncryptThenMAC(Framed):
    """
    OpenSSH's C{*-etm@openssh.com} MACs: the length travels in clear, the
    rest is encrypted, and the MAC covers C{seqnr || length || ciphertext},
    so nothing is decrypted before it is authenticated.

    AES-CTR with an HMAC goes through C{hub.ssh._packets.EtM} when it was
    built (C{native=False} or another cipher: cryptography): one C call per
    packet, where cryptography takes three cipher calls and four for the
    HMAC (its copy, two updates, its end).
    """

    def __init__(
        self, name: bytes, cipher: Cipher[Any], mac: HMACAlgorithm, native: bool = True
    ) -> None:
        super().__init__()
        self.name = name
        self._mac = mac
        self._macSize = mac.size
        self.blockSize = max(8, cipher.algorithm.block_size // 8)  # type: ignore[attr-defined]
        # A stream (CTR) is encrypted piece by piece straight into the wire
        # buffer; a block mode needs the framed plaintext in one piece.
        self._stream = isinstance(cipher.mode, modes.CTR)
        if (
            native
            and isinstance(cipher.mode, modes.CTR)
            and isinstance(cipher.algorithm, algorithms.AES)
        ):
            self._c = _native(
                _CEtM, cipher.algorithm.key, cipher.mode.nonce, mac.digestName, mac.key
            )
        if self._c is None:
            self._enc = cipher.encryptor()
            self._dec = cipher.decryptor()

    def sealInto(
        self, seqnr: int, head: bytes, data: Bytes, out: memoryview | None = None
    ) -> memoryview:
        size = len(head) + len(data)
        bs = self.blockSize
        # padLength(bs, size, True), inline: this runs once per packet.
        pad = bs - (size + 1) % bs
        if pad < 4:
            pad += bs
        length = 1 + size + pad
        end = 4 + length
        total = end + self._macSize
        wire = self._wire.take(total) if out is None else out
        if self._c is not None:
            return wire[: self._c.seal_into(seqnr, head, data, self._padding.take(pad), wire)]
        _UINT32.pack_into(wire, 0, length)
        if self._stream:
            # padding_length || head, then the data from where it lies (a
            # channel's TCP read), then the padding: CTR's keystream runs on
            # across calls, so this is the packet encrypted in one, without
            # first copying the data into a framed plaintext.
            update = self._enc.update_into
            start = 5 + len(head)
            stop = start + len(data)
            update(_PAD_LENGTH[pad] + head, wire[4:start])
            update(data, wire[start:stop])
            update(self._padding.take(pad), wire[stop:end])
        else:
            plain = self._plain.take(length)
            frameInto(plain, head, data, pad, self._padding)
            self._enc.update_into(plain[:length], wire[4:end])
        wire[end:total] = self._mac.mac(seqnr, wire[:end])
        return wire[:total]

    def openFrom(self, seqnr: int, buf: Bytes, pos: int) -> tuple[memoryview, int] | None:
        if self._c is not None:
            return self._openWithC(seqnr, buf, pos, self._macSize)
        if len(buf) - pos < 4:
            return None
        (packet_length,) = _UINT32.unpack_from(buf, pos)
        checkLength(packet_length, self.blockSize, True)
        end = pos + 4 + packet_length
        need = 4 + packet_length + self._macSize
        if len(buf) - pos < need:
            self.wanted = need
            return None
        self.wanted = 0
        plain = self._plain.take(packet_length)[:packet_length]
        with memoryview(buf) as view:
            if not self._mac.verify(seqnr, view[pos:end], view[end : pos + need]):
                raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC")
            self._dec.update_into(view[pos + 4 : end], plain)
        return unframeBody(plain), need


class AESGCMProtection(Framed):
    """
    C{aes128-gcm@openssh.com} / C{aes256-gcm@openssh.com}: RFC 5647 as
    OpenSSH implements it.  The length is in clear and is the additional
    authenticated data; the 12-byte nonce is a 4-byte fixed field and an
    8-byte invocation counter, both from the key exchange's IV, and the
    counter goes up by one per packet; a 16-byte tag replaces the MAC.
    """

    blockSize = 16
    TAG_SIZE = 16
    _NONCE = struct.Struct("!4sQ")

    def __init__(self, name: bytes, key: bytes, iv: bytes) -> None:
        super().__init__()
        self.name = name
        self._aead = AESGCM(key)
        self.fixed = iv[:4]
        self.invocationCounter = int.from_bytes(iv[4:12], "big")

    def _nonce(self) -> bytes:
        return self._NONCE.pack(self.fixed, self.invocationCounter)

    def _advance(self) -> None:
        self.invocationCounter = (self.invocationCounter + 1) % (1 << 64)

    def sealInto(
        self, seqnr: int, head: bytes, data: Bytes, out: memoryview | None = None
    ) -> memoryview:
        pad = padLength(16, len(head) + len(data), True)
        length = 1 + len(head) + len(data) + pad
        total = 4 + length + 16
        plain = self._plain.take(length)
        wire = self._wire.take(total) if out is None else out
        frameInto(plain, head, data, pad, self._padding)
        aad = _UINT32.pack(length)
        wire[:4] = aad
        self._aead.encrypt_into(self._nonce(), plain[:length], aad, wire[4:total])
        self._advance()
        return wire[:total]

    def openFrom(self, seqnr: int, buf: Bytes, pos: int) -> tuple[memoryview, int] | None:
        if len(buf) - pos < 4:
            return None
        (packet_length,) = _UINT32.unpack_from(buf, pos)
        checkLength(packet_length, 16, True)
        need = 4 + packet_length + 16
        if len(buf) - pos < need:
            self.wanted = need
            return None
        self.wanted = 0
        plain = self._plain.take(packet_length)[:packet_length]
        with memoryview(buf) as view:
            try:
                self._aead.decrypt_into(
                    self._nonce(), view[pos + 4 : pos + need], view[pos : pos + 4], plain
                )
            except InvalidTag:
                raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC") from None
        self._advance()
        return unframeBody(plain), need


class ChaCha20Poly1305Protection(Framed):
    """
    C{chacha20-poly1305@openssh.com} (OpenSSH PROTOCOL.chacha20poly1305).

    The 64 bytes of key material hold K_2 (first 32 bytes, for the packet
    body and the Poly1305 key) and K_1 (last 32, for the length).  The
    sequence number is the nonce.  The length is encrypted with K_1 at block
    counter 0; the Poly1305 key is the first 32 bytes of K_2's keystream at
    block 0; the body is encrypted with K_2 from block 1, i.e. right after
    that block in the same keystream; the tag covers the encrypted length
    and the encrypted body.

    This is original (D. J. Bernstein) ChaCha20 with a 64-bit block counter
    and a 64-bit nonce.  cryptography's 16-byte ChaCha20 "nonce" is the
    cipher's last four state words: the little-endian counter (0 here)
    followed by the nonce, which OpenSSH fills with the big-endian sequence
    number.

    Every packet is sealed and opened with one call of
    C{hub.ssh._packets} when it was built: OpenSSL's ChaCha20 (the
    library's vector code) driven from C as OpenSSH's own
    C{cipher-chachapoly-libcrypto.c} does, with a Poly1305 key and context
    set up once per packet in C.  Through cryptography the same packet is
    two nonce resets, three ChaCha20 calls and a Poly1305 object: 5 us of
    CPU for a packet of a few bytes against 0.7, 12.5 us for a 32 KiB one
    against 8.  Without the extension (or with C{native=False}, which the
    tests use to compare the two) cryptography does it all.
    """

    blockSize = 8
    TAG_SIZE = 16
    KEY_SIZE = 64
    _IV = struct.Struct("!8xQ")
    _BLOCK0 = bytes(64)

    def __init__(self, name: bytes, key: bytes, native: bool = True) -> None:
        if len(key) < self.KEY_SIZE:
            raise ValueError("chacha20-poly1305 needs 64 bytes of key")
        super().__init__()
        self.name = name
        self._c = _native(_CChaChaPoly, key[:64]) if native else None
        if self._c is None:
            zero = bytes(16)
            self._main = Cipher(algorithms.ChaCha20(key[:32], zero), mode=None).encryptor()
            self._header = Cipher(algorithms.ChaCha20(key[32:64], zero), mode=None).encryptor()
            self._block0 = memoryview(bytearray(64))
            self._polyKey = self._block0[:32]
            self._length = memoryview(bytearray(4))
            # The length of the packet being waited for, decrypted once.
            self._pending: tuple[int, int] | None = None

    def sealBody(self, seqnr: int, body: bytes) -> bytes:
        """
        Protect an already framed and padded body (exposed for known-answer
        tests, which need fixed padding).
        """
        if self._c is not None:
            pad = body[0]
            wire = self._wire.take(len(body) + 20)
            used = self._c.seal_into(seqnr, b"", body[1 : len(body) - pad],
                                     body[len(body) - pad :], wire)
            return wire[:used].tobytes()
        return self._sealFramed(seqnr, memoryview(body)).tobytes()

    def sealInto(
        self, seqnr: int, head: bytes, data: Bytes, out: memoryview | None = None
    ) -> memoryview:
        size = len(head) + len(data)
        # padLength(8, size, True), inline: this runs once per packet.
        pad = 8 - (size + 1) % 8
        if pad < 4:
            pad += 8
        length = 1 + size + pad
        if self._c is not None:
            wire = self._wire.take(length + 20) if out is None else out
            return wire[: self._c.seal_into(seqnr, head, data, self._padding.take(pad), wire)]
        plain = self._plain.take(length)
        frameInto(plain, head, data, pad, self._padding)
        return self._sealFramed(seqnr, plain[:length], out)

    def _sealFramed(
        self, seqnr: int, body: memoryview, out: memoryview | None = None
    ) -> memoryview:
        length = len(body)
        end = 4 + length
        total = end + 16
        wire = self._wire.take(total) if out is None else out
        iv = self._IV.pack(seqnr)
        self._header.reset_nonce(iv)
        self._header.update_into(_UINT32.pack(length), wire[:4])
        self._startBody(iv)
        self._main.update_into(body, wire[4:end])
        wire[end:total] = Poly1305.generate_tag(self._polyKey, wire[:end])
        return wire[:total]

    def _startBody(self, iv: bytes) -> None:
        # Block 0 of K_2 gives the Poly1305 key; the stream is then at block 1.
        self._main.reset_nonce(iv)
        self._main.update_into(self._BLOCK0, self._block0)

    def openFrom(self, seqnr: int, buf: Bytes, pos: int) -> tuple[memoryview, int] | None:
        if self._c is not None:
            return self._openWithC(seqnr, buf, pos, 16)
        return self._openWithCryptography(seqnr, buf, pos)

    def _openWithCryptography(
        self, seqnr: int, buf: Bytes, pos: int
    ) -> tuple[memoryview, int] | None:
        if len(buf) - pos < 4:
            return None
        iv = self._IV.pack(seqnr)
        if self._pending is None or self._pending[0] != seqnr:
            self._header.reset_nonce(iv)
            with memoryview(buf) as view:
                self._header.update_into(view[pos : pos + 4], self._length)
            (packet_length,) = _UINT32.unpack(self._length)
            checkLength(packet_length, 8, True)
            self._pending = (seqnr, packet_length)  # not decrypted again
        packet_length = self._pending[1]
        end = pos + 4 + packet_length
        need = 4 + packet_length + 16
        if len(buf) - pos < need:
            self.wanted = need
            return None
        self.wanted = 0
        self._pending = None
        plain = self._plain.take(packet_length)[:packet_length]
        self._startBody(iv)
        with memoryview(buf) as view:
            try:
                Poly1305.verify_tag(
                    self._polyKey, view[pos:end], view[end : pos + need].tobytes()
                )
            except InvalidSignature:
                raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC") from None
            self._main.update_into(view[pos + 4 : end], plain)
        return unframeBody(plain), need
