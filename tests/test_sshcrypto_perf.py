"""
The zero-copy packet paths (sealInto/openFrom), the padding pool, the
receive buffer and writeNow: plain values, no reactor.
"""

from __future__ import annotations

import os
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet.testing import StringTransport

from callhomehub.sshcrypto_buffers import PaddingPool, ReceiveBuffer, ScratchBuffer
from callhomehub.sshcrypto_ciphers import AES128_GCM, AES256_GCM, CHACHA20_POLY1305
from callhomehub.sshcrypto_packet import (
    AESGCMProtection,
    ChaCha20Poly1305Protection,
    EncryptAndMAC,
    EncryptThenMAC,
    HMACAlgorithm,
    PacketError,
    PacketProtection,
)
from callhomehub.sshcrypto_tcpwrite import writeNow


def _pair(kind: str) -> tuple[PacketProtection, PacketProtection]:
    if kind == "chacha":
        key = os.urandom(64)
        return (
            ChaCha20Poly1305Protection(CHACHA20_POLY1305, key),
            ChaCha20Poly1305Protection(CHACHA20_POLY1305, key),
        )
    if kind in ("gcm128", "gcm256"):
        name, size = (AES128_GCM, 16) if kind == "gcm128" else (AES256_GCM, 32)
        key, iv = os.urandom(size), os.urandom(12)
        return AESGCMProtection(name, key, iv), AESGCMProtection(name, key, iv)
    if kind == "etm":
        key, iv, integ = os.urandom(16), os.urandom(16), os.urandom(32)

        def etm() -> EncryptThenMAC:
            return EncryptThenMAC(
                b"aes128-ctr",
                Cipher(algorithms.AES(key), modes.CTR(iv)),
                HMACAlgorithm(sha256, integ),
            )

        return etm(), etm()
    return (
        EncryptAndMAC.fromCipher(b"none", None, None),
        EncryptAndMAC.fromCipher(b"none", None, None),
    )


KINDS = ["chacha", "gcm128", "gcm256", "etm", "none"]


@pytest.mark.parametrize("kind", KINDS)
def test_parts_sealed_as_one_payload(kind: str) -> None:
    sender, receiver = _pair(kind)
    data = os.urandom(32768)
    head = b"\x5e" + bytes(8)
    wires = []
    for seqnr, chunk in enumerate([memoryview(data), memoryview(data)[5:900], b""]):
        wires.append(sender.sealInto(seqnr, head, chunk).tobytes())
    for seqnr, (wire, chunk) in enumerate(zip(wires, [data, data[5:900], b""], strict=True)):
        assert receiver.open(seqnr, wire) == (head + chunk, len(wire))


@pytest.mark.parametrize("kind", KINDS)
def test_open_from_offsets_of_one_buffer(kind: str) -> None:
    sender, receiver = _pair(kind)
    payloads = [b"\x5e" + os.urandom(n) for n in (1, 100, 32768, 7)]
    stream = bytearray(b"junk")
    sizes = []
    for seqnr, payload in enumerate(payloads):
        wire = sender.seal(seqnr, payload)
        sizes.append(len(wire))
        stream += wire
    pos = 4
    for seqnr, payload in enumerate(payloads):
        # Every prefix short of the whole packet is "not yet".
        for cut in (pos, pos + 3, pos + sizes[seqnr] - 1):
            assert receiver.openFrom(seqnr, bytes(stream[:cut]), pos) is None
        opened = receiver.openFrom(seqnr, stream, pos)
        assert opened is not None
        view, used = opened
        assert view.tobytes() == payload
        view.release()
        pos += used
    assert pos == len(stream)
    stream += b"more"  # no view of the buffer is left behind


@pytest.mark.parametrize("kind", ["chacha", "gcm128", "etm"])
def test_tampering_at_an_offset_rejected(kind: str) -> None:
    sender, receiver = _pair(kind)
    stream = bytearray(bytes(10) + sender.seal(0, b"\x5e" + bytes(50)))
    stream[30] ^= 1
    with pytest.raises(PacketError):
        receiver.openFrom(0, stream, 10)
    stream += b"x"


def test_seal_returns_bytes_of_its_own() -> None:
    sender, receiver = _pair("gcm128")
    first = sender.seal(0, b"\x5eone")
    view = sender.sealInto(1, b"\x5e", b"two")
    second = view.tobytes()
    sender.seal(2, b"\x5ethree")  # reuses the buffer under `view`
    assert receiver.open(0, first) == (b"\x5eone", len(first))
    assert receiver.open(1, second) == (b"\x5etwo", len(second))


def test_padding_pool_refills_in_bulk_and_never_repeats() -> None:
    calls: list[int] = []

    def urandom(n: int) -> bytes:
        calls.append(n)
        return os.urandom(n)

    pool = PaddingPool(urandom)
    taken = b"".join(pool.take(n).tobytes() for n in [4, 19, 255] * 100)
    assert len(taken) == 278 * 100
    assert len(calls) <= len(taken) // (PaddingPool.REFILL - 255) + 1
    # Padding comes from consecutive, unshared pool bytes: no 16-byte window
    # of random data shows up twice.
    windows = {taken[i : i + 16] for i in range(0, len(taken) - 16, 16)}
    assert len(windows) == (len(taken) - 16 + 15) // 16


def test_scratch_buffer_grows_without_invalidating_views() -> None:
    scratch = ScratchBuffer()
    small = scratch.take(10)
    small[:3] = b"abc"
    large = scratch.take(40000)
    assert len(large) >= 40000 and small[:3] == b"abc"
    assert scratch.take(100) is large


def test_receive_buffer() -> None:
    buf = ReceiveBuffer()
    read = b"0123456789"
    buf.append(read)
    assert buf.data is read  # nothing left over: no copy
    buf.pos = 8
    buf.append(b"ab")
    assert buf.rest() == b"89ab" and buf.pending() == 4
    assert isinstance(buf.data, bytearray)
    view = memoryview(buf.data)  # a view alive blocks resizing in place
    buf.pos += 1
    buf.append(b"cd")
    assert buf.rest() == b"9abcd"
    assert view.tobytes()[:2] == b"89"
    buf.pos += 5
    buf.append(b"next")
    assert buf.rest() == b"next" and buf.data == b"next"


def test_write_now_queues_on_other_transports() -> None:
    transport = StringTransport()
    data = bytearray(b"packet bytes")
    writeNow(transport, memoryview(data)[2:])
    data[:] = bytes(len(data))  # the caller reuses its buffer
    assert transport.value() == b"cket bytes"
