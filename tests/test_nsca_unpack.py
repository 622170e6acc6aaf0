"""The NSCA decoder's packet unpacking: the C extension (hub/intake/_nsca.c) against
its pure-Python twin, on well-formed, damaged and random packets."""

from __future__ import annotations

import pytest
from fuzz_targets import nsca_packet
from hypothesis import given
from hypothesis import strategies as st

from hub.intake import nsca
from hub.intake.nsca import LEGACY_PACKET_SIZE, PACKET_SIZE, unpack_c, unpack_py, xor_pad

needs_c = pytest.mark.skipif(unpack_c is None, reason="C extension not built (no compiler)")
sizes = st.sampled_from([PACKET_SIZE, LEGACY_PACKET_SIZE])
# None (methods 0 and the mcrypt ones: already plaintext) or a method 1 pad.
pads = st.one_of(st.none(), st.tuples(st.binary(min_size=128, max_size=128),
                                      st.binary(max_size=20)).map(
    lambda t: xor_pad(t[0], t[1], PACKET_SIZE)))


def encrypted(packets: list[bytes], size: int, pad: bytes | None) -> bytes:
    """The packets of `size` bytes among `packets`, each XORed with `pad` as method 1 does."""
    same = [p for p in packets if len(p) == size]
    if pad is None:
        return b"".join(same)
    return b"".join(bytes(b ^ k for b, k in zip(p, pad, strict=False)) for p in same)


@needs_c
@given(st.lists(nsca_packet, max_size=4), sizes, pads, st.binary(max_size=900))
def test_c_and_python_agree_on_packets_damaged_or_not(packets: list[bytes], size: int,
                                                      pad: bytes | None, tail: bytes) -> None:
    buffer = bytearray(encrypted(packets, size, pad) + tail)
    assert unpack_c is not None
    assert unpack_c(buffer, size, pad) == unpack_py(buffer, size, pad)


@needs_c
@given(st.binary(max_size=3 * PACKET_SIZE), sizes, pads)
def test_c_and_python_agree_on_random_bytes(data: bytes, size: int, pad: bytes | None) -> None:
    assert unpack_c is not None
    assert unpack_c(data, size, pad) == unpack_py(data, size, pad)


@needs_c
def test_c_cuts_fields_like_strncpy_and_replaces_bad_utf8() -> None:
    packet = bytearray(PACKET_SIZE)
    packet[0:2] = b"\x00\x03"
    packet[14:78] = b"h" * 64             # no NUL: 63 bytes kept
    packet[78:81] = b"\xff\xfe\x00"       # not UTF-8
    packet[206:206 + 4096] = b"o" * 4096  # no NUL: 4095 bytes kept
    assert unpack_c is not None
    (fields,) = unpack_c(bytes(packet), PACKET_SIZE, None)
    assert fields[5:] == ("h" * 63, "\ufffd\ufffd", "o" * 4095)
    assert fields == unpack_py(bytes(packet), PACKET_SIZE, None)[0]


@pytest.mark.parametrize("unpack", [unpack_py, unpack_c], ids=["python", "c"])
def test_a_bad_size_or_a_short_pad_is_refused(unpack: nsca.Unpack | None) -> None:
    if unpack is None:
        pytest.skip("C extension not built (no compiler)")
    with pytest.raises(ValueError, match="packet size 100"):
        unpack(bytes(PACKET_SIZE), 100, None)
    with pytest.raises(ValueError, match="pad of 10 bytes"):
        unpack(bytes(PACKET_SIZE), PACKET_SIZE, bytes(10))


def test_the_decoder_uses_the_extension_when_built() -> None:
    assert nsca.unpack is (unpack_c or unpack_py)
