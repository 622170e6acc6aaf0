"""
Known-answer and rule tests for hub.ssh.packet, _kex and
_userauth: plain values, no reactor.

The ChaCha20-Poly1305 reference below is written from OpenSSH's
PROTOCOL.chacha20poly1305 and cipher-chachapoly.c with a pure-Python
ChaCha20 block function and Poly1305, sharing no code with the module.
"""

from __future__ import annotations

import hmac
import os
import struct
from hashlib import sha256, sha512

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh.common import NS

from hub.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    IMPLICIT_MAC,
    ModernSSHCiphers,
    cipherBlockLimit,
)
from hub.ssh.kex import (
    STRICT_KEX_CLIENT,
    KexInit,
    RekeyMeter,
    macNeutralPeerKexInit,
    negotiatedCiphers,
    strictKexAllows,
)
from hub.ssh.packet import (
    DISCONNECT_MAC_ERROR,
    AESGCMProtection,
    ChaCha20Poly1305Protection,
    EncryptAndMAC,
    EncryptThenMAC,
    HMACAlgorithm,
    PacketError,
    padLength,
)
from hub.ssh.testing import newEd25519Key, newRSAKey
from hub.ssh.userauth import chooseSignatureAlgorithm

_M = 0xFFFFFFFF


def _rotl(v: int, c: int) -> int:
    return ((v << c) & _M) | (v >> (32 - c))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _M
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _M
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & _M
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _M
    s[b] = _rotl(s[b] ^ s[c], 7)


def refChachaBlock(key: bytes, counter: int, iv: bytes) -> bytes:
    """
    One 64-byte ChaCha20 block, original layout: words 12-13 the 64-bit
    counter, words 14-15 the 8-byte IV (chacha_ivsetup in OpenSSH).
    """
    state = list(struct.unpack("<4L", b"expand 32-byte k"))
    state += list(struct.unpack("<8L", key))
    state += [counter & _M, counter >> 32]
    state += list(struct.unpack("<2L", iv))
    w = state[:]
    for _ in range(10):
        _quarter(w, 0, 4, 8, 12)
        _quarter(w, 1, 5, 9, 13)
        _quarter(w, 2, 6, 10, 14)
        _quarter(w, 3, 7, 11, 15)
        _quarter(w, 0, 5, 10, 15)
        _quarter(w, 1, 6, 11, 12)
        _quarter(w, 2, 7, 8, 13)
        _quarter(w, 3, 4, 9, 14)
    return struct.pack("<16L", *[(w[i] + state[i]) & _M for i in range(16)])


def refPoly1305(key: bytes, msg: bytes) -> bytes:
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:32], "little")
    p = (1 << 130) - 5
    acc = 0
    for i in range(0, len(msg), 16):
        acc = (acc + int.from_bytes(msg[i : i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) % (1 << 128)).to_bytes(16, "little")


def _xor(data: bytes, stream: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, stream, strict=False))


def refChachaPolySeal(key: bytes, seqnr: int, body: bytes) -> bytes:
    """
    PROTOCOL.chacha20poly1305: K_2 = key[:32] (main), K_1 = key[32:]
    (header); seqnr big-endian as the IV; length with K_1 at block 0;
    Poly1305 key = K_2 block 0; body with K_2 from block 1.
    """
    k2, k1 = key[:32], key[32:64]
    iv = seqnr.to_bytes(8, "big")
    length = _xor(struct.pack(">L", len(body)), refChachaBlock(k1, 0, iv))
    stream = b"".join(
        refChachaBlock(k2, 1 + i, iv) for i in range((len(body) + 63) // 64)
    )
    encrypted = length + _xor(body, stream)
    return encrypted + refPoly1305(refChachaBlock(k2, 0, iv)[:32], encrypted)


# Worked example of draft-ietf-sshm-chacha20-poly1305-02, Appendix A
# (64 bytes of key material, sequence number 7).
DRAFT_KEY = bytes.fromhex(
    "8bbff6855fc102338c373e73aac0c914f076a905b2444a32eecaffeae22becc5"
    "e9b7a7a5825a8249346ec1c28301cf394543fc7569887d76e168f37562ac0740"
)
DRAFT_TEXT = b"Lorem ipsum dolor sit amet, consectetur adipisicing elit"
DRAFT_PAYLOAD = b"\x5e" + struct.pack(">LL", 0, len(DRAFT_TEXT)) + DRAFT_TEXT
DRAFT_BODY = b"\x06" + DRAFT_PAYLOAD + bytes.fromhex("4e43e804dc6c")
DRAFT_WIRE = bytes.fromhex(
    "2c3ecce4"
    "a5bc05895bf07a7ba956b6c68829ac7c83b780b7000ecde745afc705bbc378ce"
    "03a280236b87b53bed5839662302b164b6286a48cd1e097138e3cb909b8b2b82"
    "9dd18d2a35ff82d9"
    "95349e855bf02c298ef775f2d1a7e8b8"
)


class TestChaCha20Poly1305:
    def test_reference_matches_published_vector(self) -> None:
        assert refChachaPolySeal(DRAFT_KEY, 7, DRAFT_BODY) == DRAFT_WIRE

    @pytest.mark.parametrize("c", [True, False])  # the C path (when built), cryptography's
    def test_seal_matches_published_vector(self, c: bool) -> None:
        protection = ChaCha20Poly1305Protection(CHACHA20_POLY1305, DRAFT_KEY, native=c)
        assert protection.sealBody(7, DRAFT_BODY) == DRAFT_WIRE

    def test_open_published_vector(self) -> None:
        protection = ChaCha20Poly1305Protection(CHACHA20_POLY1305, DRAFT_KEY)
        payload, used = protection.open(7, DRAFT_WIRE + b"next") or (b"", 0)
        assert used == len(DRAFT_WIRE)
        assert payload == DRAFT_PAYLOAD

    @pytest.mark.parametrize("seqnr", [0, 1, 255, 256, 0x01020304, 0xFFFFFFFF])
    @pytest.mark.parametrize("size", [1, 63, 64, 200])
    def test_against_reference(self, seqnr: int, size: int) -> None:
        key = os.urandom(64)
        protection = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
        payload = os.urandom(size)
        wire = protection.seal(seqnr, payload)
        # Padding is random; recover the body from the reference keystream
        # and check the whole packet against the reference construction.
        iv = seqnr.to_bytes(8, "big")
        (length,) = struct.unpack(
            ">L", _xor(wire[:4], refChachaBlock(key[32:], 0, iv))
        )
        stream = b"".join(
            refChachaBlock(key[:32], 1 + i, iv) for i in range((length + 63) // 64)
        )
        body = _xor(wire[4 : 4 + length], stream)
        assert body[1 : length - body[0]] == payload
        assert length % 8 == 0 and body[0] >= 4
        assert wire == refChachaPolySeal(key, seqnr, body)
        assert protection.open(seqnr, wire) == (payload, len(wire))

    def test_partial_then_whole(self) -> None:
        key = os.urandom(64)
        wire = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).seal(3, b"x" * 100)
        receiver = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
        for cut in (0, 3, 4, 20, len(wire) - 1):
            assert receiver.open(3, wire[:cut]) is None
        assert receiver.open(3, wire) == (b"x" * 100, len(wire))

    @pytest.mark.parametrize("where", [0, 5, -1])
    def test_tampering_rejected(self, where: int) -> None:
        key = os.urandom(64)
        wire = bytearray(ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).seal(9, b"hi"))
        wire[where] ^= 0x01
        receiver = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
        with pytest.raises(PacketError):
            receiver.open(9, bytes(wire))

    def test_wrong_sequence_number_rejected(self) -> None:
        key = os.urandom(64)
        wire = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).seal(9, b"hi")
        with pytest.raises(PacketError):
            ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).open(10, wire)


class TestAESGCM:
    @pytest.mark.parametrize("name,keySize", [(AES128_GCM, 16), (AES256_GCM, 32)])
    def test_rfc5647_nonce_and_aad(self, name: bytes, keySize: int) -> None:
        key = os.urandom(keySize)
        fixed = os.urandom(4)
        # Start near the top so the 64-bit invocation counter wraps.
        iv = fixed + (2**64 - 2).to_bytes(8, "big")
        sender = AESGCMProtection(name, key, iv)
        receiver = AESGCMProtection(name, key, iv)
        for i, counter in enumerate([2**64 - 2, 2**64 - 1, 0, 1]):
            payload = b"packet %d" % i
            wire = sender.seal(1000 + i, payload)
            (length,) = struct.unpack(">L", wire[:4])
            assert length % 16 == 0 and len(wire) == 4 + length + 16
            nonce = fixed + counter.to_bytes(8, "big")
            body = AESGCM(key).decrypt(nonce, wire[4:], wire[:4])
            assert body[1 : length - body[0]] == payload and body[0] >= 4
            assert receiver.open(1000 + i, wire) == (payload, len(wire))
        assert sender.invocationCounter == receiver.invocationCounter == 2

    @pytest.mark.parametrize("where", [0, 3, 4, 20, -1])
    def test_tampered_packet_rejected(self, where: int) -> None:
        key, iv = os.urandom(16), os.urandom(12)
        wire = bytearray(AESGCMProtection(AES128_GCM, key, iv).seal(0, b"x" * 40))
        wire[where] ^= 0x10
        # Extra bytes so that a packet with a tampered length is complete.
        with pytest.raises(PacketError):
            AESGCMProtection(AES128_GCM, key, iv).open(0, bytes(wire) + bytes(64))

    def test_replayed_packet_rejected(self) -> None:
        key, iv = os.urandom(16), os.urandom(12)
        sender = AESGCMProtection(AES128_GCM, key, iv)
        receiver = AESGCMProtection(AES128_GCM, key, iv)
        wire = sender.seal(0, b"once")
        assert receiver.open(0, wire) is not None
        with pytest.raises(PacketError):
            receiver.open(1, wire)


class TestEncryptThenMAC:
    @pytest.mark.parametrize("digest", [sha256, sha512])
    def test_layout(self, digest: type) -> None:
        key, iv, integ = os.urandom(16), os.urandom(16), os.urandom(64)
        sender = EncryptThenMAC(
            b"aes128-ctr",
            Cipher(algorithms.AES(key), modes.CTR(iv)),
            HMACAlgorithm(digest, integ),
        )
        decryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
        size = digest().digest_size
        for seqnr in (5, 6):
            wire = sender.seal(seqnr, b"payload %d" % seqnr)
            (length,) = struct.unpack(">L", wire[:4])
            assert length % 16 == 0
            ciphertext, tag = wire[4 : 4 + length], wire[4 + length :]
            expected = hmac.new(
                integ[:size], struct.pack(">L", seqnr) + wire[: 4 + length], digest
            ).digest()
            assert tag == expected
            body = decryptor.update(ciphertext)
            assert body[1 : length - body[0]] == b"payload %d" % seqnr

    def test_independently_built_packet(self) -> None:
        key, iv, integ = os.urandom(32), os.urandom(16), os.urandom(32)
        body = bytes((7,)) + b"\x5eABCDEFG" + bytes(7)
        assert len(body) % 16 == 0
        ciphertext = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(body)
        data = struct.pack(">L", len(body)) + ciphertext
        tag = hmac.new(integ, struct.pack(">L", 77) + data, sha256).digest()
        receiver = EncryptThenMAC(
            b"aes256-ctr",
            Cipher(algorithms.AES(key), modes.CTR(iv)),
            HMACAlgorithm(sha256, integ),
        )
        assert receiver.open(77, data + tag) == (b"\x5eABCDEFG", len(data) + 32)

    def test_bad_mac_rejected_before_decrypting(self) -> None:
        key, iv, integ = os.urandom(16), os.urandom(16), os.urandom(32)

        def make() -> EncryptThenMAC:
            return _aes128CtrEtm(key, iv, integ)

        wire = bytearray(make().seal(1, b"data"))
        wire[3] ^= 0x10  # the clear length is authenticated too
        with pytest.raises(PacketError):
            make().open(1, bytes(wire) + bytes(64))


def _etmReference(
    key: bytes, iv: bytes, integ: bytes, digest: type, wires: list[bytes]
) -> list[bytes]:
    """
    The payloads of consecutive EtM packets (numbered from 0), opened with
    one AES-CTR stream and hashlib's HMAC, checking OpenSSH's padding rule.
    """
    decryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
    size = digest().digest_size
    payloads = []
    for seqnr, wire in enumerate(wires):
        (length,) = struct.unpack(">L", wire[:4])
        assert len(wire) == 4 + length + size and length % 16 == 0
        expected = hmac.new(
            integ[:size], struct.pack(">L", seqnr) + wire[: 4 + length], digest
        ).digest()
        assert wire[4 + length :] == expected
        body = decryptor.update(wire[4 : 4 + length])
        pad = body[0]
        assert 4 <= pad < 4 + 16
        payloads.append(body[1 : length - pad])
    return payloads


@pytest.mark.parametrize("digest", [sha256, sha512])
@pytest.mark.parametrize("keySize", [16, 24, 32])
def test_etm_ctr_packets_in_sequence_match_reference(digest: type, keySize: int) -> None:
    """
    The CTR keystream runs on across the pieces of one packet (length
    byte and head, data, padding) and across packets: a stream of packets
    of every size around the block boundaries, sealed into scratch and
    given buffers, opens with one reference stream, and with the hub's own.
    """
    key, iv, integ = os.urandom(keySize), os.urandom(16), os.urandom(64)

    def make() -> EncryptThenMAC:
        return EncryptThenMAC(
            b"aes%d-ctr" % (keySize * 8),
            Cipher(algorithms.AES(key), modes.CTR(iv)),
            HMACAlgorithm(digest, integ),
        )

    sender, receiver = make(), make()
    out = memoryview(bytearray(40000))
    sent, wires = [], []
    sizes = [*range(0, 40), 255, 4095, 4096, 4097, 32759, 32768]
    for seqnr, size in enumerate(sizes):
        head, data = b"\x5e" + os.urandom(seqnr % 9), os.urandom(size)
        target = out if seqnr % 2 else None
        wires.append(sender.sealInto(seqnr, head, memoryview(data), target).tobytes())
        sent.append(head + data)
    assert _etmReference(key, iv, integ, digest, wires) == sent
    stream, pos = b"".join(wires), 0
    for seqnr, payload in enumerate(sent):
        opened = receiver.openFrom(seqnr, stream, pos)
        assert opened is not None and opened[0].tobytes() == payload
        pos += opened[1]
    assert pos == len(stream)


def _aes128CtrEtm(key: bytes, iv: bytes, integ: bytes) -> EncryptThenMAC:
    """One direction's aes128-ctr + hmac-sha2-256-etm, fresh for these keys."""
    return EncryptThenMAC(
        b"aes128-ctr",
        Cipher(algorithms.AES(key), modes.CTR(iv)),
        HMACAlgorithm(sha256, integ),
    )


def test_etm_wrong_tag_is_a_mac_error() -> None:
    key, iv, integ = os.urandom(16), os.urandom(16), os.urandom(32)

    def make() -> EncryptThenMAC:
        return _aes128CtrEtm(key, iv, integ)

    wire = make().seal(3, b"\x5edata")
    tampered = bytearray(wire)
    tampered[-1] ^= 1
    for seqnr, packet in ((3, bytes(tampered)), (4, wire)):
        with pytest.raises(PacketError) as caught:
            make().open(seqnr, packet)
        assert caught.value.reason == DISCONNECT_MAC_ERROR
    assert make().open(3, wire) == (b"\x5edata", len(wire))


class TestEncryptAndMAC:
    def test_none_cipher_framing(self) -> None:
        wire = EncryptAndMAC.fromCipher(b"none", None, None).seal(0, b"\x14abc")
        (length,) = struct.unpack(">L", wire[:4])
        assert (length + 4) % 8 == 0 and len(wire) == 4 + length
        assert EncryptAndMAC.fromCipher(b"none", None, None).open(0, wire) == (
            b"\x14abc",
            len(wire),
        )

    def test_bad_padding_length_rejected(self) -> None:
        packet = struct.pack(">LB", 12, 200) + bytes(11)
        with pytest.raises(PacketError):
            EncryptAndMAC.fromCipher(b"none", None, None).open(0, packet)

    def test_oversized_length_rejected(self) -> None:
        with pytest.raises(PacketError):
            EncryptAndMAC.fromCipher(b"none", None, None).open(0, b"\x7f" + bytes(7))


@pytest.mark.parametrize(
    "block,size,clear,expected",
    [(8, 1, False, 10), (8, 3, False, 8), (16, 1, True, 14), (16, 11, True, 4), (16, 12, True, 19)],
)
def test_padding(block: int, size: int, clear: bool, expected: int) -> None:
    assert padLength(block, size, clear) == expected


def test_modern_ciphers_aead_has_implicit_mac() -> None:
    ciphers = ModernSSHCiphers(AES128_GCM, b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-256")
    assert ciphers.outMACType == IMPLICIT_MAC
    assert ciphers.inMACType == b"hmac-sha2-256"
    ciphers.setKeys(*(os.urandom(64) for _ in range(6)))
    assert isinstance(ciphers.outbound, AESGCMProtection)
    assert isinstance(ciphers.inbound, EncryptAndMAC)


def test_cipher_block_limits() -> None:
    assert cipherBlockLimit(CHACHA20_POLY1305) == 1 << 30
    assert cipherBlockLimit(AES256_GCM) == 16 << 32


def _kexinit(kex: list[bytes], ciphers: list[bytes], macs: list[bytes]) -> KexInit:
    lists = [kex, [b"ssh-ed25519"], ciphers, ciphers, macs, macs, [b"none"], [b"none"], [], []]
    payload = bytes(16) + b"".join(NS(b",".join(x)) for x in lists) + bytes(5)
    return KexInit.parse(payload)


class TestKexRules:
    def test_kexinit_round_trip(self) -> None:
        peer = _kexinit([b"curve25519-sha256", STRICT_KEX_CLIENT], [b"aes128-ctr"], [b"x"])
        assert KexInit.parse(peer.toBytes()) == peer
        assert STRICT_KEX_CLIENT in peer.kexAlgorithms

    def test_malformed_kexinit(self) -> None:
        with pytest.raises(ValueError):
            KexInit.parse(bytes(16) + b"\x00\x00\x00\x09abc")

    def test_macs_ignored_only_for_aead(self) -> None:
        ours = [AES128_GCM, b"aes128-ctr"]
        peer = _kexinit([b"k"], [AES128_GCM], [b"hmac-md5"])
        neutral = macNeutralPeerKexInit(ours, [b"hmac-sha2-256"], peer, isClient=False)
        assert neutral.lists[4] == neutral.lists[5] == (b"hmac-sha2-256",)
        peer = _kexinit([b"k"], [b"aes128-ctr"], [b"hmac-md5"])
        neutral = macNeutralPeerKexInit(ours, [b"hmac-sha2-256"], peer, isClient=False)
        assert neutral.lists[4] == (b"hmac-md5",)

    def test_client_preference_decides(self) -> None:
        peer = _kexinit([b"k"], [AES256_GCM, AES128_GCM], [])
        assert negotiatedCiphers([AES128_GCM, AES256_GCM], peer, isClient=True) == (
            AES128_GCM,
            AES128_GCM,
        )
        assert negotiatedCiphers([AES128_GCM, AES256_GCM], peer, isClient=False) == (
            AES256_GCM,
            AES256_GCM,
        )

    @pytest.mark.parametrize(
        "message,isClient,kexInitSeen,allowed",
        [
            (20, False, False, True),
            (2, False, False, False),  # IGNORE before KEXINIT
            (2, False, True, False),  # IGNORE during kex
            (4, True, True, False),  # DEBUG
            (3, True, True, False),  # UNIMPLEMENTED
            (20, False, True, False),  # a second KEXINIT
            (30, False, True, True),
            (31, False, True, False),  # a reply sent to the server
            (31, True, True, True),
            (21, True, True, True),
            (1, True, True, True),  # DISCONNECT
            (5, False, True, False),  # SERVICE_REQUEST too early
        ],
    )
    def test_strict_kex_table(
        self, message: int, isClient: bool, kexInitSeen: bool, allowed: bool
    ) -> None:
        assert strictKexAllows(message, isClient, kexInitSeen) is allowed

    def test_rekey_meter(self) -> None:
        meter = RekeyMeter(limit=100, maxPackets=3)
        assert not meter.sent(60)  # sent() answers `due` as it stands after the packet
        assert not meter.due
        meter.received(100)
        assert meter.due
        assert meter.sent(0)  # due by the bytes received
        meter.restart(1000)
        assert not meter.due
        assert [meter.sent(1) for _ in range(3)] == [False, False, True]
        assert meter.due
        # The packets of one read, counted together: by packets, and by bytes.
        meter.restart(1000)
        assert not meter.sentMany(500, 2)
        assert meter.sentMany(10, 1)  # the third packet
        meter.restart(1000)
        assert meter.sentMany(1000, 1)


class TestSignatureChoice:
    def test_rsa_follows_server_sig_algs(self) -> None:
        key = newRSAKey(1024)
        assert chooseSignatureAlgorithm(key, b"ssh-ed25519,rsa-sha2-256") == b"rsa-sha2-256"
        assert (
            chooseSignatureAlgorithm(key, b"rsa-sha2-256,rsa-sha2-512") == b"rsa-sha2-512"
        )
        assert chooseSignatureAlgorithm(key, b"ssh-rsa") is None
        assert chooseSignatureAlgorithm(key, b"ssh-rsa", allowSHA1=True) == b"ssh-rsa"
        assert chooseSignatureAlgorithm(key, None) == b"rsa-sha2-512"

    def test_other_keys_unchanged(self) -> None:
        assert chooseSignatureAlgorithm(newEd25519Key(), b"rsa-sha2-256") == b"ssh-ed25519"
