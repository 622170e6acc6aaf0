"""AES-CTR with hmac-sha2-*-etm in one C call per packet (hub/ssh/_packets.c, EtM) against
the same construction through cryptography, its twin when the extension is not built:
packets sealed byte for byte, a run of packets in sequence (the CTR stream carried on,
the HMAC started again each time), opening either one's packets whole, in pieces and at
every size, and tampering."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ssh_chachapoly import opens_in_pieces
from twisted.logger import capturedLogs

from hub.ssh import packet
from hub.ssh.buffers import PaddingPool
from hub.ssh.ciphers import CHACHA20_POLY1305
from hub.ssh.framing import HMACAlgorithm
from hub.ssh.packet import (
    DISCONNECT_MAC_ERROR,
    ChaCha20Poly1305Protection,
    EncryptThenMAC,
    PacketError,
)

try:
    from hub.ssh import _packets
except ImportError:  # not built: the packet layer uses cryptography alone
    _packets = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_packets is None, reason="C extension not built")

Make = Callable[[bool], packet.Framed]


def etm(key_size: int, digest: Callable[..., object], seed: bytes) -> Make:
    key, iv, integ = seed[:key_size], seed[32:48], seed[48:112]

    def make(native: bool) -> packet.Framed:
        cipher = Cipher(algorithms.AES(key), modes.CTR(iv))
        return EncryptThenMAC(b"aes-ctr", cipher, HMACAlgorithm(digest, integ), native=native)

    return make


KINDS = {
    "aes128-ctr+sha256": lambda seed: etm(16, hashlib.sha256, seed),
    "aes192-ctr+sha256": lambda seed: etm(24, hashlib.sha256, seed),
    "aes256-ctr+sha512": lambda seed: etm(32, hashlib.sha512, seed),
}
SIZES = [0, 1, 100, 4096 - 30, 4096 + 30, 32768 - 9, 70_000]


def twins(kind: str, seed: bytes, padding: bytes = b"\x07") -> tuple[packet.Framed,
                                                                      packet.Framed]:
    """The C protection and cryptography's, from the same keys, padding alike."""
    make = KINDS[kind](seed)
    c, py = make(True), make(False)
    for p in (c, py):
        p._padding = PaddingPool(lambda n: padding * (n // len(padding) + 1))
    return c, py


@needs_c
@pytest.mark.parametrize("kind", KINDS)
def test_the_c_path_is_used_when_built(kind: str) -> None:
    c, py = twins(kind, os.urandom(112))
    c.sealInto(0, b"\x5e", b"x")
    assert c._c is not None and py._c is None
    assert not hasattr(c, "_enc") and not hasattr(c, "_dec")  # no cryptography contexts


@needs_c
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(KINDS)), st.binary(min_size=112, max_size=112),
       st.integers(0, 0xFFFFFFFF), st.binary(min_size=1, max_size=9),
       st.lists(st.one_of(st.binary(max_size=300), st.sampled_from(SIZES).map(os.urandom)),
                min_size=1, max_size=5),
       st.binary(min_size=1, max_size=16))
def test_a_run_of_packets_agrees_with_cryptography(kind: str, seed: bytes, seqnr: int,
                                                   head: bytes, datas: list[bytes],
                                                   padding: bytes) -> None:
    c, py = twins(kind, seed, padding)
    c_in, py_in = twins(kind, seed, padding)
    for n, data in enumerate(datas):
        seq = (seqnr + n) & 0xFFFFFFFF
        wire = bytes(c.sealInto(seq, head, data))
        assert wire == bytes(py.sealInto(seq, head, data))
        for receiver in (c_in, py_in):
            payload, used = receiver.openFrom(seq, b"..." + wire + b"next", 3) or (b"", 0)
            assert (bytes(payload), used) == (head + data, len(wire))


@needs_c
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [10, 5000, 40_000])
def test_in_pieces_then_whole(kind: str, size: int) -> None:
    seed = os.urandom(112)
    sender, _ = twins(kind, seed)
    receiver, _ = twins(kind, seed)
    opens_in_pieces(receiver, 3, bytes(sender.sealInto(3, b"", b"x" * size)), b"x" * size)


@needs_c
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", [4, 5, -17, -1])
@pytest.mark.parametrize("size", [8, 40_000])
def test_tampering_is_a_mac_error(kind: str, where: int, size: int) -> None:
    seed = os.urandom(112)
    sender, _ = twins(kind, seed)
    receiver, _ = twins(kind, seed)
    wire = bytearray(sender.sealInto(9, b"h", b"h" * size))
    wire[where] ^= 0x01
    with pytest.raises(PacketError) as caught:
        receiver.openFrom(9, bytes(wire), 0)
    assert caught.value.reason == DISCONNECT_MAC_ERROR


@needs_c
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [0, 8, 17, 2**31])
def test_a_bad_length_is_refused_without_waiting_for_it(kind: str, length: int) -> None:
    receiver, _ = twins(kind, os.urandom(112))
    with pytest.raises(PacketError, match="bad packet"):
        receiver.openFrom(0, length.to_bytes(4, "big") + bytes(20), 0)


@needs_c
@pytest.mark.parametrize("kind", KINDS)
def test_etm_wrong_sequence_number_is_a_mac_error(kind: str) -> None:
    seed = os.urandom(112)
    sender, _ = twins(kind, seed)
    receiver, _ = twins(kind, seed)
    wire = bytes(sender.sealInto(5, b"", b"hello"))
    with pytest.raises(PacketError):
        receiver.openFrom(6, wire, 0)


@needs_c
@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_too_small_raises(kind: str) -> None:
    c, _ = twins(kind, os.urandom(112))
    with pytest.raises(ValueError, match="too small"):
        c.sealInto(1, b"\x5e", b"x" * 100, memoryview(bytearray(64)))


@pytest.mark.parametrize("kind", ["etm", "chacha"])
def test_an_openssl_that_refuses_leaves_the_packets_to_cryptography(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A FIPS-only OpenSSL has no ChaCha20 (and may refuse HMAC's EVP_MAC): the C
    # object's set-up raises, the protection works through cryptography, and the
    # log says so once per kind, not once per connection.
    def refusing(*args: object) -> None:
        raise RuntimeError("OpenSSL failed: ChaCha20 key set-up")

    refusing.__name__ = kind
    monkeypatch.setattr(packet, "_CEtM" if kind == "etm" else "_CChaChaPoly", refusing)
    monkeypatch.setattr(packet, "_NATIVE_REFUSED", set())
    seed = os.urandom(112)

    def make() -> packet.Framed:
        if kind == "etm":
            return KINDS["aes128-ctr+sha256"](seed)(True)
        return ChaCha20Poly1305Protection(CHACHA20_POLY1305, seed[:64])

    with capturedLogs() as events:
        sender, receiver, other = make(), make(), make()
    assert sender._c is None and receiver._c is None and other._c is None
    wire = bytes(sender.sealInto(1, b"\x5e", b"through cryptography"))
    opened = receiver.openFrom(1, wire, 0)
    assert opened is not None and bytes(opened[0]) == b"\x5e" + b"through cryptography"
    said = [e for e in events if "not available" in e.get("log_format", "")]
    assert len(said) == 1 and "ChaCha20 key set-up" in said[0]["why"]


@needs_c
@pytest.mark.parametrize("kind", ["ChaChaPoly", "EtM"])
def test_an_object_never_keyed_refuses_instead_of_crashing(kind: str) -> None:
    # tp_new alone leaves the OpenSSL contexts NULL: a method must say so, not
    # hand NULL to OpenSSL (which would take the whole hub down).
    cls = getattr(_packets, kind)
    obj = cls.__new__(cls)
    with pytest.raises(ValueError, match="not initialised"):
        obj.seal_into(0, b"", b"x", b"1234", bytearray(100))
    with pytest.raises(ValueError, match="not initialised"):
        obj.open_into(0, bytes(64), 0, bytearray(100))
    if kind == "EtM":  # and one whose set-up failed stays unusable
        with pytest.raises(RuntimeError):
            obj.__init__(bytes(16), bytes(16), "no-such-digest", bytes(32))
        with pytest.raises(ValueError, match="not initialised"):
            obj.open_into(0, bytes(64), 0, bytearray(100))


@needs_c
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", [0, 1, 2, 3])
@pytest.mark.parametrize("bit", [0x10, 0x80])
def test_a_changed_length_never_yields_a_payload(kind: str, where: int, bit: int) -> None:
    # The length is in clear but under the MAC: changed, the packet is refused
    # (a bad length or a bad MAC) or waited for, never opened.
    seed = os.urandom(112)
    sender, _ = twins(kind, seed)
    receiver, _ = twins(kind, seed)
    wire = bytearray(sender.sealInto(9, b"h", b"i there"))
    wire[where] ^= bit
    try:
        opened = receiver.openFrom(9, bytes(wire) + bytes(256), 0)
    except PacketError:
        return
    assert opened is None


@needs_c
@pytest.mark.parametrize("kind", ["chacha", *KINDS])
@pytest.mark.parametrize("size", [10, 5000])
def test_nothing_is_decrypted_from_a_forged_packet(kind: str, size: int) -> None:
    # open_into answers None for a bad tag and leaves `out` as it was: no
    # plaintext of an unauthenticated packet reaches the caller's buffer.
    seed = os.urandom(112)
    if kind == "chacha":
        sender = ChaCha20Poly1305Protection(CHACHA20_POLY1305, seed[:64])
        receiver = ChaCha20Poly1305Protection(CHACHA20_POLY1305, seed[:64])
    else:
        sender, _ = twins(kind, seed)
        receiver, _ = twins(kind, seed)
    wire = bytearray(sender.sealInto(4, b"\x5e", os.urandom(size)))
    wire[-1] ^= 0x01
    out = bytearray(b"\xaa" * (size + 64))
    assert receiver._c.open_into(4, bytes(wire), 0, out) is None
    assert out == b"\xaa" * (size + 64)


def _c_object(kind: str, seed: bytes) -> Any:
    if kind == "chacha":
        return _packets.ChaChaPoly(seed[:64])
    digest = "sha512" if "512" in kind else "sha256"
    size = {"aes128": 16, "aes192": 24, "aes256": 32}[kind[:6]]
    return _packets.EtM(seed[:size], seed[32:48], digest, seed[48:112])


@needs_c
@pytest.mark.parametrize("kind", ["chacha", *KINDS])
@pytest.mark.parametrize("size,max_packet", [(70_000, 32768), (5, 32768), (8 * 32768, 32768),
                                             (1000, 7)])
def test_channel_data_sealed_in_one_call_is_what_each_packet_would_be(
        kind: str, size: int, max_packet: int) -> None:
    # seal_data_into (a channel's read in one call) makes the bytes seal_into makes
    # for each CHANNEL_DATA packet in turn, given the same padding, across the
    # sequence number's wrap at 2^32.
    seed, data, padding = os.urandom(112), os.urandom(size), os.urandom(20_000)
    block = 8 if kind == "chacha" else 16
    together, apart = _c_object(kind, seed), _c_object(kind, seed)
    out = bytearray(size + (size // max_packet + 1) * 200)
    count, used = together.seal_data_into(2**32 - 2, 7, data, max_packet, padding, out)
    expected, taken = b"", 0
    for n, offset in enumerate(range(0, size, max_packet)):
        chunk = data[offset : offset + max_packet]
        pad = block - (9 + len(chunk) + 1) % block
        pad += block if pad < 4 else 0
        wire = bytearray(len(chunk) + 200)
        head = b"\x5e" + (7).to_bytes(4, "big") + len(chunk).to_bytes(4, "big")
        end = apart.seal_into((2**32 - 2 + n) % 2**32, head, chunk,
                              padding[taken : taken + pad], wire)
        expected += wire[:end]
        taken += pad
    assert (count, bytes(out[:used])) == (-(-size // max_packet), expected)


@needs_c
@pytest.mark.parametrize("kind", ["chacha", "aes128-ctr+sha256"])
def test_channel_data_in_one_call_refuses_what_does_not_fit(kind: str) -> None:
    c = _c_object(kind, os.urandom(112))
    with pytest.raises(ValueError, match="too small"):
        c.seal_data_into(0, 1, bytes(70_000), 32768, os.urandom(100), bytearray(70_000))
    with pytest.raises(ValueError, match="padding"):
        c.seal_data_into(0, 1, bytes(70_000), 32768, os.urandom(10), bytearray(80_000))
    with pytest.raises(ValueError, match="maximum packet"):
        c.seal_data_into(0, 1, bytes(10), 0, os.urandom(100), bytearray(1000))


def test_without_the_c_object_channel_data_goes_packet_by_packet() -> None:
    py = KINDS["aes128-ctr+sha256"](os.urandom(112))(False)
    assert py.sealDataInto(0, 1, bytes(70_000), 32768, memoryview(bytearray(80_000))) is None
