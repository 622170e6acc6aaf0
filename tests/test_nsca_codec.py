"""NSCA wire codec: packets we build here, mutated and random bytes, and packets the real
send_nsca produces (captured at test time)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.decrepit.ciphers.modes import CFB8
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.intake.nsca import (
    LEGACY_PACKET_SIZE,
    PACKET_SIZE,
    CheckResult,
    NSCADecoder,
    NSCAError,
    check_method,
    format_command,
    make_init_packet,
    packet_crc,
    supported_methods,
)

SEND_NSCA = shutil.which("send_nsca") or (
    "/usr/sbin/send_nsca" if os.access("/usr/sbin/send_nsca", os.X_OK) else None
)
NSCA_DAEMON = "/usr/sbin/nsca" if os.access("/usr/sbin/nsca", os.X_OK) else None
IV = bytes((i * 37 + 11) % 256 for i in range(128))
T0 = 1_700_000_000
PASSWORD = "correct horse battery staple, long enough to be truncated by 3DES"
METHODS = [0, 1, 2, 3, 14]
_KEY_SIZE = {2: 8, 3: 24, 14: 32}


# --- a small reference encoder, written from nsca's C source, independent of the decoder ----

def nsca_crc32(data: bytes) -> int:
    """nsca's table-driven CRC32 (utils.c calculate_crc32), transcribed."""
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
        table.append(crc)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = ((crc >> 8) & 0x00FFFFFF) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


def build_packet(
    host: bytes, service: bytes, code: int, output: bytes, timestamp: int = T0,
    size: int = PACKET_SIZE, version: int = 3, fill: bytes = b"", crc: int | None = None,
) -> bytes:
    """A plaintext packet laid out like send_nsca's, slack filled with `fill` (else 'x')."""
    out_len = 4096 if size == PACKET_SIZE else 512
    body = bytearray((fill * (size // max(len(fill), 1) + 1))[:size] if fill else b"x" * size)
    struct.pack_into(">hxxIIh", body, 0, version, 0, timestamp, code)
    for at, length, value in ((14, 64, host), (78, 128, service), (206, out_len, output)):
        raw = value[: length - 1] + b"\0"
        body[at : at + len(raw)] = raw
    body[4:8] = struct.pack(">I", nsca_crc32(bytes(body)) if crc is None else crc)
    return bytes(body)


class Encryptor:
    """Client-side encryption for one connection, as send_nsca's encrypt_buffer does it."""

    def __init__(self, method: int, password: bytes, iv: bytes) -> None:
        self.method, self.password, self.iv = method, password, iv
        if method in _KEY_SIZE:
            key = password[: _KEY_SIZE[method]].ljust(_KEY_SIZE[method], b"\0")
            des_key = key * 3 if method == 2 else key
            alg = algorithms.AES(key) if method == 14 else TripleDES(des_key)
            block = 16 if method == 14 else 8
            self.ctx = Cipher(alg, CFB8(iv[:block])).encryptor()

    def encrypt(self, packet: bytes) -> bytes:
        if self.method == 0:
            return packet
        if self.method == 1:
            buf = bytearray(packet)
            for y in range(len(buf)):
                buf[y] ^= self.iv[y % 128]
            for y in range(len(buf)):
                if self.password:
                    buf[y] ^= self.password[y % len(self.password)]
            return bytes(buf)
        return self.ctx.update(packet)


def decoder(method: int = 1, password: str = PASSWORD, now: float = T0, max_age: int = 30,
            iv: bytes = IV) -> NSCADecoder:
    return NSCADecoder(method, password, iv, lambda: now, max_age)


def stream(method: int, packets: list[bytes], password: str = PASSWORD) -> bytes:
    enc = Encryptor(method, password.encode(), IV)
    return b"".join(enc.encrypt(p) for p in packets)


# --- basics -------------------------------------------------------------------------------

def test_init_packet_layout() -> None:
    packet = make_init_packet(IV, T0)
    assert len(packet) == 132
    assert packet[:128] == IV
    assert struct.unpack(">I", packet[128:]) == (T0,)
    with pytest.raises(ValueError, match="128"):
        make_init_packet(b"short", T0)


def test_packet_crc_is_nscas_crc_with_field_zeroed() -> None:
    packet = build_packet(b"h", b"s", 0, b"o", fill=bytes(range(256)))
    assert packet_crc(packet) == nsca_crc32(packet[:4] + bytes(4) + packet[8:])
    assert packet_crc(packet) == struct.unpack(">I", packet[4:8])[0]


@pytest.mark.parametrize("method", METHODS)
def test_supported_methods_pass_the_startup_check(method: int) -> None:
    assert method in supported_methods()
    check_method(method)


@pytest.mark.parametrize("method", [4, 8, 12, 16, 99, -1])
def test_unsupported_method_is_named(method: int) -> None:
    with pytest.raises(ValueError, match=rf"method {method}\b"):
        check_method(method)
    with pytest.raises(ValueError):
        decoder(method)


# --- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [PACKET_SIZE, LEGACY_PACKET_SIZE])
@pytest.mark.parametrize("method", METHODS)
def test_round_trip_several_packets_any_chunking(method: int, size: int) -> None:
    packets = [
        build_packet(b"web1", b"HTTP", 0, b"OK - 200", size=size),
        build_packet(b"web1", b"", 1, b"host warn\nsecond line", size=size),
        build_packet(b"db", b"disk /", -2, b"C:\\temp 99%", size=size, fill=b"\x17\0z"),
    ]
    data = stream(method, packets)
    expected = [
        CheckResult("web1", "HTTP", 0, "OK - 200", T0),
        CheckResult("web1", "", 1, "host warn\nsecond line", T0),
        CheckResult("db", "disk /", -2, "C:\\temp 99%", T0),
    ]
    for step in (1, 7, 719, 720, 721, size, 5000, len(data)):
        d = decoder(method)
        got = []
        for i in range(0, len(data), step):
            got += d.feed(data[i : i + step])
        assert got == expected, step
        assert d.packet_size == size
        assert d.pending == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(METHODS),
    legacy=st.booleans(),
    password=st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), max_size=70),
    records=st.lists(
        st.tuples(
            st.text(st.characters(min_codepoint=1, max_codepoint=0x7FF), min_size=1, max_size=20),
            st.text(st.characters(min_codepoint=1, max_codepoint=0x7FF), max_size=40),
            st.integers(-32768, 32767),
            # Any encodable text (no lone surrogates: the test itself encodes it).
            st.text(st.characters(min_codepoint=1, codec="utf-8"), max_size=200),
        ),
        min_size=1, max_size=4,
    ),
    cuts=st.lists(st.integers(1, 5000), max_size=6),
    skew=st.integers(-30, 30),
)
def test_round_trip_property(method: int, legacy: bool, password: str, records: list,
                             cuts: list[int], skew: int) -> None:
    size = LEGACY_PACKET_SIZE if legacy else PACKET_SIZE
    packets = [
        build_packet(h.encode(), s.encode(), c, o.encode(), T0 + skew, size=size,
                     fill=os.urandom(8))
        for h, s, c, o in records
    ]
    data = stream(method, packets, password)
    d = decoder(method, password)
    got: list[CheckResult] = []
    at = 0
    for cut in sorted(cuts):
        got += d.feed(data[at:cut])
        at = max(at, cut)
    got += d.feed(data[at:])
    assert got == [CheckResult(h, s, c, o, T0 + skew) for h, s, c, o in records]


@pytest.mark.parametrize("size", [PACKET_SIZE, LEGACY_PACKET_SIZE])
@pytest.mark.parametrize("length", [0, 1, 49, 50, 51, 305, 306, 307, 511, 1000, 4095, 5000])
def test_xor_outputs_of_every_length_and_their_crc(length: int, size: int) -> None:
    # Method 1 decodes the output in steps up to its NUL and checks the CRC on the
    # ciphertext: outputs ending at, before and after a step, and filling the field.
    output = bytes(range(33, 127)) * (length // 94 + 1)
    packet = build_packet(b"h", b"s", 2, output[:length], size=size, fill=b"\x17\0z")
    field = {PACKET_SIZE: 4096, LEGACY_PACKET_SIZE: 512}[size]
    assert decoder(1).feed(stream(1, [packet])) == [
        CheckResult("h", "s", 2, output[: min(length, field - 1)].decode(), T0)]
    # The second packet (the first tells a legacy connection's packet size by its CRC).
    corrupt = bytearray(stream(1, [packet, packet]))
    corrupt[-3] ^= 0x40  # in the slack after the output: only the CRC sees it
    with pytest.raises(NSCAError, match="bad CRC32"):
        decoder(1).feed(bytes(corrupt))


# --- field handling -----------------------------------------------------------------------

def test_strings_are_cut_like_strncpy() -> None:
    long = build_packet(b"h" * 80, b"s" * 200, 0, b"o" * 5000)
    (r,) = decoder(0).feed(long)
    assert (len(r.host), len(r.service), len(r.output)) == (63, 127, 4095)
    (r,) = decoder(0).feed(build_packet(b"h", b"", 0, b"o" * 600, size=LEGACY_PACKET_SIZE))
    assert len(r.output) == 511


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    (r,) = decoder(0).feed(build_packet(b"h\xff", b"svc", 0, b"\xc3("))
    assert r.host == "h\ufffd" and r.output == "\ufffd("


def test_xor_with_empty_password_is_iv_only() -> None:
    packet = build_packet(b"h", b"s", 3, b"out")
    wire = bytes(b ^ IV[i % 128] for i, b in enumerate(packet))
    assert decoder(1, "").feed(wire) == [CheckResult("h", "s", 3, "out", T0)]


def test_mcrypt_password_is_truncated_and_zero_padded() -> None:
    packet = build_packet(b"h", b"s", 0, b"o")
    # 3DES uses 24 bytes of the password: what follows cannot matter.
    wire = stream(3, [packet], PASSWORD[:24] + "anything else")
    assert decoder(3, PASSWORD).feed(wire) == [CheckResult("h", "s", 0, "o", T0)]
    # AES-256 with a short password: the key is the password and zeros.
    key = b"pw".ljust(32, b"\0")
    wire = Cipher(algorithms.AES(key), CFB8(IV[:16])).encryptor().update(packet)
    assert decoder(14, "pw").feed(wire) == [CheckResult("h", "s", 0, "o", T0)]


# --- rejections ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_bad_version_is_refused_after_two_bytes(method: int) -> None:
    data = stream(method, [build_packet(b"h", b"s", 0, b"o", version=2)])
    with pytest.raises(NSCAError, match="version 2"):
        decoder(method).feed(data[:2])


@pytest.mark.parametrize("method", [1, 2, 3, 14])
def test_wrong_password_is_refused(method: int) -> None:
    data = stream(method, [build_packet(b"h", b"s", 0, b"o")], "other password")
    with pytest.raises(NSCAError, match=r"version|CRC"):
        decoder(method).feed(data)


def test_bad_crc_is_refused() -> None:
    with pytest.raises(NSCAError, match="CRC"):
        decoder(0).feed(build_packet(b"h", b"s", 0, b"o", crc=12345))


def test_stale_and_future_timestamps_name_both_values() -> None:
    old = build_packet(b"h", b"s", 0, b"o", timestamp=T0 - 31)
    with pytest.raises(NSCAError, match=rf"stale.*{T0 - 31}.*{T0}"):
        decoder(0).feed(old)
    new = build_packet(b"h", b"s", 0, b"o", timestamp=T0 + 31)
    with pytest.raises(NSCAError, match=rf"future.*{T0 + 31}.*{T0}"):
        decoder(0).feed(new)
    edge = [build_packet(b"h", b"s", 0, b"o", timestamp=T0 + d) for d in (-30, 30)]
    assert len(decoder(0).feed(b"".join(edge))) == 2
    assert len(decoder(0, max_age=0).feed(old + new)) == 2


def test_empty_host_is_garbage() -> None:
    with pytest.raises(NSCAError, match="empty host"):
        decoder(0).feed(build_packet(b"", b"s", 0, b"o"))


def test_error_keeps_earlier_results_and_stops_the_decoder() -> None:
    good = build_packet(b"h", b"s", 0, b"o")
    d = decoder(1)
    with pytest.raises(NSCAError) as info:
        d.feed(stream(1, [good, good, build_packet(b"h", b"s", 0, b"o", crc=1)]))
    assert info.value.results == (CheckResult("h", "s", 0, "o", T0),) * 2
    with pytest.raises(NSCAError, match="earlier error"):
        d.feed(stream(1, [good]))


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(METHODS), data=st.binary(max_size=9000))
def test_fuzz_random_bytes(method: int, data: bytes) -> None:
    try:
        results = decoder(method).feed(data)
    except NSCAError:
        return
    assert all(isinstance(r, CheckResult) for r in results)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    legacy=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 2 * PACKET_SIZE - 1), st.integers(1, 255)),
                   max_size=4),
    cut=st.integers(0, 2 * PACKET_SIZE),
)
def test_fuzz_mutated_packets(method: int, legacy: bool, flips: list, cut: int) -> None:
    size = LEGACY_PACKET_SIZE if legacy else PACKET_SIZE
    data = bytearray(stream(method, [build_packet(b"h", b"s", 0, b"o", size=size)] * 2))
    for at, mask in flips:
        data[at % len(data)] ^= mask
    try:
        results = decoder(method).feed(bytes(data[:cut]))
    except NSCAError:
        return
    assert all(isinstance(r, CheckResult) for r in results)


# --- command file lines -------------------------------------------------------------------

def test_format_service_and_host_lines() -> None:
    svc = CheckResult("web1", "HTTP", 2, "bad\nC:\\x\tend", T0)
    assert format_command(svc, 42) == (
        "[42] PROCESS_SERVICE_CHECK_RESULT;web1;HTTP;2;bad\\nC:\\\\x\tend\n"
    )
    host = CheckResult("web1", "", 0, "up", T0)
    assert format_command(host, 42) == "[42] PROCESS_HOST_CHECK_RESULT;web1;0;up\n"


def test_format_keeps_names_verbatim_but_never_splits_a_line() -> None:
    line = format_command(CheckResult("a\\b\nc", "s\\v", 1, "o", T0), 1)
    assert line == "[1] PROCESS_SERVICE_CHECK_RESULT;a\\b\\nc;s\\v;1;o\n"
    assert line.count("\n") == 1


# --- the real send_nsca -------------------------------------------------------------------

RECORDS = (
    b"web1\tHTTP\t0\tOK - 200 in 0.1 s\x17"
    b"web1\t1\thost warn\x17"
    b"db\tdisk /\t2\tline1\nline2 C:\\path;semi\x17"
)
EXPECTED = [
    CheckResult("web1", "HTTP", 0, "OK - 200 in 0.1 s", T0),
    CheckResult("web1", "", 1, "host warn", T0),
    CheckResult("db", "disk /", 2, "line1\nline2 C:\\path;semi", T0),
]


def capture_send_nsca(tmp_path: Path, method: int, *args: str) -> tuple[bytes, str]:
    """Run send_nsca against a one-shot socket server; return what it sent and its stdout."""
    assert SEND_NSCA is not None
    cfg = tmp_path / f"send_nsca_{method}.cfg"
    cfg.write_text(f"password={PASSWORD}\nencryption_method={method}\n")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(20)
    captured: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(20)
            conn.sendall(make_init_packet(IV, T0))
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            captured.append(b"".join(chunks))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [SEND_NSCA, "-H", "127.0.0.1", "-p", str(server.getsockname()[1]), "-c", str(cfg),
             *args],
            input=RECORDS, capture_output=True, timeout=30, check=False,
        )
        thread.join(timeout=30)
    finally:
        server.close()
    assert proc.returncode == 0, proc
    return captured[0], proc.stdout.decode()


def send_nsca_supports_legacy() -> bool:
    if SEND_NSCA is None:
        return False
    usage = subprocess.run([SEND_NSCA, "-h"], capture_output=True, check=False)
    return b"--legacy-2-7-mode" in usage.stdout + usage.stderr


@pytest.mark.e2e
@pytest.mark.skipif(SEND_NSCA is None, reason="send_nsca (nsca-client) is not installed")
@pytest.mark.parametrize("method", [0, 1, 2, 3, 14])
def test_real_send_nsca_packets_decode(tmp_path: Path, method: int) -> None:
    wire, out = capture_send_nsca(tmp_path, method)
    assert "3 data packet(s) sent" in out
    assert len(wire) == 3 * PACKET_SIZE
    d = decoder(method, now=T0 + 1)
    assert d.feed(wire[:1000]) == []
    assert d.feed(wire[1000:]) == EXPECTED
    assert d.packet_size == PACKET_SIZE


@pytest.mark.e2e
@pytest.mark.skipif(not send_nsca_supports_legacy(),
                    reason="this send_nsca has no --legacy-2-7-mode (added in nsca 2.10)")
@pytest.mark.parametrize("method", [0, 1, 2, 3, 14])
def test_real_send_nsca_legacy_packets_decode(tmp_path: Path, method: int) -> None:
    wire, out = capture_send_nsca(tmp_path, method, "--legacy-2-7-mode")
    assert "3 data packet(s) sent" in out
    assert len(wire) == 3 * LEGACY_PACKET_SIZE
    d = decoder(method, now=T0)
    assert d.feed(wire) == EXPECTED
    assert d.packet_size == LEGACY_PACKET_SIZE


@pytest.fixture
def nsca_daemon(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The real nsca daemon in the foreground, writing to a regular command file."""
    if NSCA_DAEMON is None or SEND_NSCA is None:
        pytest.skip("the nsca daemon and send_nsca are not both installed")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    commands = tmp_path / "nagios.cmd"
    commands.write_text("")
    cfg = tmp_path / "nsca.cfg"
    cfg.write_text(
        f"server_port={port}\nserver_address=127.0.0.1\ncommand_file={commands}\n"
        f"alternate_dump_file={tmp_path / 'dump'}\nappend_to_file=1\n"
        f"password={PASSWORD}\ndecryption_method=1\nmax_packet_age=30\n"
    )
    proc = subprocess.Popen([NSCA_DAEMON, "-f", "-c", str(cfg), "--single"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("the nsca daemon did not start listening")
                time.sleep(0.05)
        yield port, commands
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.e2e
def test_format_command_matches_the_real_daemon(tmp_path: Path,
                                                nsca_daemon: tuple[int, Path]) -> None:
    port, commands = nsca_daemon
    cfg = tmp_path / "send.cfg"
    cfg.write_text(f"password={PASSWORD}\nencryption_method=1\n")
    subprocess.run([SEND_NSCA or "", "-H", "127.0.0.1", "-p", str(port), "-c", str(cfg)],
                   input=RECORDS, capture_output=True, timeout=30, check=True)
    deadline = time.monotonic() + 10
    while commands.read_text().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon gives no signal but the file itself
    lines = commands.read_text().splitlines(keepends=True)
    assert len(lines) == 3, lines
    for line, result in zip(lines, EXPECTED, strict=True):
        stamp = int(line[1 : line.index("]")])
        assert line == format_command(result, stamp)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [PACKET_SIZE, LEGACY_PACKET_SIZE])
def test_a_whole_packet_with_a_bad_version_is_refused_as_such_after_good_ones(
        method: int, size: int) -> None:
    # Arriving whole, its version is read with the header (not from two bytes alone),
    # and is still what the error names, ahead of its (valid) CRC.
    good = build_packet(b"h", b"s", 0, b"o", size=size)
    bad = build_packet(b"h", b"s", 0, b"o", size=size, version=2)
    with pytest.raises(NSCAError, match="version 2") as info:
        decoder(method).feed(stream(method, [good, good, bad]))
    assert info.value.kind == "version"
    assert info.value.results == (CheckResult("h", "s", 0, "o", T0),) * 2
