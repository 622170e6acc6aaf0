"""
The zero-copy packet paths (sealInto/openFrom), the padding pool, the
receive buffer and writeNow: plain values, no reactor.
"""

from __future__ import annotations

import errno
import os
import socket
from hashlib import sha256
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from hub.ssh.buffers import PaddingPool, ReceiveBuffer, ScratchBuffer
from hub.ssh.channels import MAX_PACKET
from hub.ssh.ciphers import AES128_GCM, AES256_GCM, CHACHA20_POLY1305
from hub.ssh.packet import (
    AESGCMProtection,
    ChaCha20Poly1305Protection,
    EncryptAndMAC,
    EncryptThenMAC,
    HMACAlgorithm,
    PacketError,
    PacketProtection,
)
from hub.ssh.packetio import SEAL_OVERHEAD
from hub.ssh.tcpwrite import OutputBatch, writeNow
from hub.tunnel.splice import READ_SIZE


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


@pytest.mark.parametrize("read_size", [1, 13, 4096, 40000, 65536, 262144])
@pytest.mark.parametrize("kind", KINDS)
def test_reads_split_anywhere_give_every_packet(kind: str, read_size: int) -> None:
    """The receive loop as the transport runs it: reads of any size, a
    leftover completed from the next read by what the packet layer wants."""
    sender, receiver = _pair(kind)
    payloads = [b"\x5e" + os.urandom(n) for n in (32768, 1, 700, 32768, 32768, 9, 20000)]
    stream = b"".join(sender.seal(seqnr, p) for seqnr, p in enumerate(payloads))
    buf = ReceiveBuffer()
    got: list[bytes] = []
    for start in range(0, len(stream), read_size):
        buf.append(stream[start : start + read_size], receiver.wanted)
        while (opened := receiver.openFrom(len(got), buf.data, buf.pos)) is not None:
            view, used = opened
            got.append(view.tobytes())
            view.release()
            buf.advance(used)
    assert got == payloads
    assert buf.pending() == 0 and buf.data == b""  # nothing kept once all is taken


def test_leftover_is_completed_without_copying_the_whole_read() -> None:
    sender, receiver = _pair("gcm128")
    first, second = sender.seal(0, b"\x5e" + bytes(1000)), sender.seal(1, b"\x5e" + bytes(5000))
    buf = ReceiveBuffer()
    buf.append(first[:100])
    assert receiver.openFrom(0, buf.data, buf.pos) is None
    assert receiver.wanted == len(first)
    read = first[100:] + second
    buf.append(read, receiver.wanted)
    assert len(buf.data) == len(first)  # only the first packet was joined
    opened = receiver.openFrom(0, buf.data, buf.pos)
    assert opened is not None
    opened[0].release()
    buf.advance(opened[1])
    assert buf.data is read and buf.pos == len(first) - 100  # the read, in place
    opened = receiver.openFrom(1, buf.data, buf.pos)
    assert opened is not None and opened[0].tobytes() == b"\x5e" + bytes(5000)
    assert receiver.wanted == 0


def test_a_wrong_wanted_size_costs_a_copy_not_data() -> None:
    buf = ReceiveBuffer(b"abcdef")
    buf.advance(2)
    buf.append(b"ghij", wanted=6)  # "cdef" + "gh" joined, "ij" later
    assert buf.rest() == b"cdefghij" and buf.pending() == 8
    buf.advance(3)  # less than the joined part was a packet after all
    buf.append(b"kl", wanted=0)
    assert buf.rest() == b"fghijkl" and buf.later is None


@pytest.mark.parametrize("kind", KINDS)
def test_seal_into_a_given_buffer(kind: str) -> None:
    sender, receiver = _pair(kind)
    out = memoryview(bytearray(40000))
    wire = sender.sealInto(0, b"\x5e", os.urandom(30000), out).tobytes()
    assert receiver.open(0, wire) is not None


class _CountingSocket:
    """A socket that counts sends and may fail them."""

    def __init__(self, sock: socket.socket, error: int = 0) -> None:
        self.sock = sock
        self.sends: list[int] = []
        self.error = error

    def send(self, data: Any) -> int:
        if self.error:
            raise OSError(self.error, os.strerror(self.error))
        self.sends.append(len(data))
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()


def _tcp(error: int = 0) -> tuple[tcp.Connection, _CountingSocket, socket.socket,
                                  MemoryReactorClock]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    clock = MemoryReactorClock()
    conn = tcp.Connection(ours, Protocol(), clock)
    conn.connected = True
    counting = _CountingSocket(ours, error)
    conn.socket = counting  # type: ignore[assignment]
    return conn, counting, theirs, clock


def _read_all(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return data


def test_batch_writes_several_packets_with_one_send() -> None:
    conn, counting, theirs, _ = _tcp()
    sender, receiver = _pair("gcm128")
    payloads = [b"\x5e" + os.urandom(n) for n in (32768, 32768, 100, 32768)]
    batch = OutputBatch(size=128 * 1024)
    assert batch.begin(conn)
    assert not batch.begin(conn)  # one batch at a time
    total = 0
    for seqnr, payload in enumerate(payloads):
        wire = sender.sealInto(seqnr, b"", payload, batch.take(len(payload) + 128))
        total += len(wire)
        batch.commit(wire)
    assert counting.sends == []
    batch.end()
    assert counting.sends == [total]
    stream = _read_all(theirs, total)
    pos = 0
    for seqnr, payload in enumerate(payloads):
        opened = receiver.open(seqnr, stream[pos:])
        assert opened is not None and opened[0] == payload
        pos += opened[1]


def test_the_channel_packets_of_one_read_go_out_in_one_send() -> None:
    # What a splice's 256 KiB TCP read becomes: 32 KiB CHANNEL_DATA packets,
    # each given the room the transport reserves for it.
    conn, counting, _theirs, _ = _tcp()
    sender, _receiver = _pair("etm")
    head = b"\x5e" + bytes(8)  # message number, recipient channel, length
    data = memoryview(os.urandom(READ_SIZE))
    batch = OutputBatch()
    assert batch.begin(conn)
    total = 0
    for seqnr, offset in enumerate(range(0, READ_SIZE, MAX_PACKET)):
        chunk = data[offset : offset + MAX_PACKET]
        room = batch.take(len(head) + len(chunk) + SEAL_OVERHEAD)
        wire = sender.sealInto(seqnr, head, chunk, room)
        total += len(wire)
        batch.commit(wire)
    batch.end()
    assert counting.sends == [total]


def test_a_full_batch_is_written_before_the_next_packet() -> None:
    conn, counting, theirs, _ = _tcp()
    batch = OutputBatch(size=1000)
    assert batch.begin(conn)
    for chunk in (b"a" * 600, b"b" * 600, b"c" * 5000):  # the last is oversized
        room = batch.take(len(chunk))
        room[: len(chunk)] = chunk
        batch.commit(room[: len(chunk)])
    batch.end()
    assert counting.sends == [600, 600, 5000]
    assert _read_all(theirs, 6200) == b"a" * 600 + b"b" * 600 + b"c" * 5000


def test_write_now_aborts_on_a_send_error() -> None:
    conn, _, _, clock = _tcp(error=errno.ECONNRESET)
    lost: list[Any] = []
    conn.connectionLost = lost.append  # type: ignore[method-assign]
    writeNow(conn, b"data")
    assert conn._aborting and not conn.dataBuffer and not conn._tempDataBuffer
    clock.advance(0)
    assert len(lost) == 1


def test_write_now_queues_what_a_full_socket_refuses() -> None:
    conn, _, _, _ = _tcp(error=errno.EAGAIN)
    writeNow(conn, memoryview(b"queued"))
    assert not conn._aborting and conn._tempDataBuffer == [b"queued"]
