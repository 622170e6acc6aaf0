"""chacha20-poly1305@openssh.com's one-call path in C (hub/ssh/_packets.c) against
the same construction through cryptography, which is its twin when it is not built:
Poly1305 tags, sealed packets byte for byte, and opening either one's packets, whole,
in pieces, tampered with, and at every size (small, bulk, larger than the scratch
buffer)."""

from __future__ import annotations

import os
import tracemalloc

import pytest
from cryptography.hazmat.primitives.poly1305 import Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ssh_packet import DRAFT_KEY, DRAFT_PAYLOAD, DRAFT_WIRE

from hub.ssh import packet
from hub.ssh.buffers import PaddingPool
from hub.ssh.ciphers import CHACHA20_POLY1305
from hub.ssh.framing import Framed
from hub.ssh.packet import DISCONNECT_MAC_ERROR, ChaCha20Poly1305Protection, PacketError

try:
    from hub.ssh import _packets
except ImportError:  # not built: the packet layer uses OpenSSL alone
    _packets = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_packets is None, reason="C extension not built (no compiler)")
# Where the C path changes course: Poly1305 by the C code up to 512 bytes and by
# OpenSSL above (DONNA_MAX in _packets.c), and where a packet no longer fits
# an idle connection's scratch buffer (a page) and it is grown.
DONNA_MAX = 512
PAGE = 4096


def pair(key: bytes, padding: bytes) -> tuple[ChaCha20Poly1305Protection,
                                              ChaCha20Poly1305Protection]:
    """The C path and OpenSSL's for `key`, both padding with the same bytes."""
    c = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
    ossl = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key, native=False)
    for p in (c, ossl):
        p._padding = PaddingPool(lambda n: padding * (n // len(padding) + 1))
    return c, ossl


@needs_c
def test_the_c_path_is_used_when_built() -> None:
    assert packet._CChaChaPoly is not None
    assert ChaCha20Poly1305Protection(CHACHA20_POLY1305, DRAFT_KEY)._c is not None
    assert ChaCha20Poly1305Protection(CHACHA20_POLY1305, DRAFT_KEY, native=False)._c is None


@needs_c
@settings(max_examples=400)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=300))
def test_poly1305_matches_cryptography(key: bytes, message: bytes) -> None:
    assert _packets.poly1305(key, message) == Poly1305.generate_tag(key, message)


@needs_c
@pytest.mark.parametrize("key", [b"\xff" * 32, bytes(16) + b"\xff" * 16, bytes(32),
                                 b"\xff" * 16 + bytes(16)])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 64, 255, 1000])
def test_poly1305_edge_values(key: bytes, size: int) -> None:
    # All-ones keys and messages drive the accumulator next to 2^130 - 5.
    for message in (b"\xff" * size, bytes(size), os.urandom(size)):
        assert _packets.poly1305(key, message) == Poly1305.generate_tag(key, message)


@needs_c
def test_opens_the_published_vector() -> None:
    protection = ChaCha20Poly1305Protection(CHACHA20_POLY1305, DRAFT_KEY)
    assert protection.open(7, DRAFT_WIRE + b"next") == (DRAFT_PAYLOAD, len(DRAFT_WIRE))


@needs_c
@settings(max_examples=200)
@given(st.binary(min_size=64, max_size=64), st.integers(0, 0xFFFFFFFF),
       st.binary(min_size=1, max_size=9),
       st.one_of(st.binary(max_size=200),
                 st.sampled_from([DONNA_MAX - 20, PAGE - 20, 32768 - 9, 70000])
                 .flatmap(lambda n: st.integers(n - 20, n + 20)).map(os.urandom)),
       st.binary(min_size=1, max_size=16))
def test_seal_and_open_agree_with_openssl(key: bytes, seqnr: int, head: bytes, data: bytes,
                                          padding: bytes) -> None:
    c, ossl = pair(key, padding)
    wire = bytes(c.sealInto(seqnr, head, data))
    assert wire == bytes(ossl.sealInto(seqnr, head, data))
    for receiver in pair(key, padding):
        payload, used = receiver.openFrom(seqnr, b"..." + wire + b"next", 3) or (b"", 0)
        assert (bytes(payload), used) == (head + data, len(wire))


@needs_c
@pytest.mark.parametrize("size", [10, DONNA_MAX + 100, PAGE + 100, 40000])
def test_in_pieces_then_whole(size: int) -> None:
    key = os.urandom(64)
    wire = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key, native=False).seal(3, b"x" * size)
    opens_in_pieces(ChaCha20Poly1305Protection(CHACHA20_POLY1305, key), 3, wire, b"x" * size)


def opens_in_pieces(receiver: Framed, seqnr: int, wire: bytes, payload: bytes) -> None:
    """`receiver` waits on every cut of `wire` (knowing its size once it has the
    length), then opens it whole, into `payload`."""
    for cut in (0, 3, 4, 20, len(wire) - 1):
        assert receiver.openFrom(seqnr, wire[:cut], 0) is None
        assert receiver.wanted == (len(wire) if cut >= 4 else 0)
    opened, used = receiver.openFrom(seqnr, wire, 0) or (b"", 0)
    assert (bytes(opened), used, receiver.wanted) == (payload, len(wire), 0)


@needs_c
@pytest.mark.parametrize("where", [4, 5, -17, -1])
@pytest.mark.parametrize("size", [8, 600, 5000, 40000])  # C tag, OpenSSL's, grown buffer
def test_tampering_is_a_mac_error(where: int, size: int) -> None:
    key = os.urandom(64)
    wire = bytearray(ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).seal(9, b"h" * size))
    wire[where] ^= 0x01
    with pytest.raises(PacketError) as caught:
        ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).openFrom(9, bytes(wire), 0)
    assert caught.value.reason == DISCONNECT_MAC_ERROR


@needs_c
@pytest.mark.parametrize("bit", [0x08, 0x10, 0x80])
def test_a_changed_length_never_yields_a_payload(bit: int) -> None:
    key = os.urandom(64)
    wire = bytearray(ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).seal(9, b"hi there"))
    wire[3] ^= bit  # still a multiple of 8: the packet seems longer, or shorter
    receiver = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
    try:
        opened = receiver.openFrom(9, bytes(wire) + bytes(256), 0)
    except PacketError:  # a bad MAC, or a length of 0
        return
    assert opened is None  # waits for a longer packet


@needs_c
def test_bad_length_refused_without_waiting_for_it() -> None:
    key = os.urandom(64)
    wire = bytearray(ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).seal(1, b"hello"))
    wire[3] ^= 0x01  # the length is no longer a multiple of 8
    with pytest.raises(PacketError, match="bad packet"):
        ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).openFrom(1, bytes(wire[:4]), 0)


@needs_c
def test_wrong_sequence_number_rejected() -> None:
    key = os.urandom(64)
    wire = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).seal(9, b"hi")
    with pytest.raises(PacketError):
        ChaCha20Poly1305Protection(CHACHA20_POLY1305, key).openFrom(10, wire, 0)


@needs_c
def test_seal_into_a_batch_that_is_too_small_raises() -> None:
    protection = ChaCha20Poly1305Protection(CHACHA20_POLY1305, os.urandom(64))
    with pytest.raises(ValueError):
        protection.sealInto(1, b"\x5e", b"x" * 100, memoryview(bytearray(64)))


def opened_memory(key: bytes, wires: list[bytes], small: bool) -> int:
    """Bytes a receiving protection holds once it has opened `wires`."""
    tracemalloc.start()
    try:
        receiver = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key, native=small)
        for n, wire in enumerate(wires):
            assert receiver.openFrom(n, wire, 0) is not None
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


@needs_c
def test_small_packets_keep_the_memory_of_a_connection_as_it_was() -> None:
    # An idle tunnel is two of these: the small path adds no buffer of its own,
    # the receive side opens into its scratch buffer (a page for small packets).
    key = os.urandom(64)
    sender = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
    wires = [bytes(sender.sealInto(n, b"\x5e", os.urandom(size)))
             for n, size in enumerate((10, 200, 900))]
    held = opened_memory(key, wires, True)
    assert held <= opened_memory(key, wires, False) + 512
    # About 5 KiB (cipher objects, padding, a page of scratch): a buffer of
    # SMALL_PACKET bytes per protection would be 4 KiB on top of it.
    assert held < 6.5 * 1024
    # A larger small packet grows the scratch buffer, as OpenSSL's path does.
    big = bytes(sender.sealInto(3, b"\x5e", b"x" * 3000))
    receiver = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
    for n, wire in enumerate(wires):
        receiver.openFrom(n, wire, 0)
    assert bytes(receiver.openFrom(3, big, 0)[0]) == b"\x5e" + b"x" * 3000  # type: ignore[index]


@needs_c
def test_every_packet_goes_through_c() -> None:
    # No cryptography contexts are even made; bulk and mid-sized packets (an
    # in-tunnel NSCA result is 4.3 KB) open in C like small ones, the scratch
    # buffer growing to the largest and staying there.
    key = os.urandom(64)
    sender, openssl = pair(key, b"\x07")
    receiver = ChaCha20Poly1305Protection(CHACHA20_POLY1305, key)
    assert not hasattr(receiver, "_main") and not hasattr(sender, "_header")
    for n, size in enumerate((10, 600, 4304, 32768, 200_000, 100)):
        data = os.urandom(size)
        wire = bytes(sender.sealInto(n, b"\x5e", data))
        assert wire == bytes(openssl.sealInto(n, b"\x5e", data))
        opened = receiver.openFrom(n, b"ab" + wire, 2)
        assert opened is not None and bytes(opened[0]) == b"\x5e" + data
        assert opened[1] == len(wire)
        again = openssl.openFrom(n, wire, 0)  # cryptography agrees
        assert again is not None and bytes(again[0]) == b"\x5e" + data
    assert len(receiver._plain.take(0)) >= 200_000
