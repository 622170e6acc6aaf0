"""NSCA 2.x intake: the Nagios Service Check Acceptor wire protocol, byte for byte.

`NSCADecoder` is a sans-IO machine (bytes in, `CheckResult` values out, `NSCAError` for
anything it rejects); `NSCAServerProtocol` is the thin Twisted adapter that sends the init
packet, feeds the decoder and hands results to a `deliver` callback.  `format_command` renders a
result as the external-command line the nsca daemon writes.

Wire format (nsca 2.7-2.10, all big-endian): the server sends a 132-byte init packet (128-byte IV,
uint32 timestamp); the client then sends data packets of 4304 bytes (int16 version 3, 2 pad bytes,
uint32 CRC32 of the packet with the CRC field zeroed, uint32 timestamp, int16 return code,
host[64], service[128], output[4096], 2 pad bytes) or, from ``send_nsca --legacy-2-7-mode``,
720 bytes (output[512]).  Strings are NUL-terminated; pad and slack bytes are random and covered
by the CRC.  Encryption is applied to whole packets: method 0 none; method 1 XOR with the IV then
with the password, both restarting at each packet; mcrypt methods in 8-bit CFB with a single
cipher state for the whole connection, key = the password copied into a zeroed buffer of the
cipher's key size (truncated if longer), IV = the first block-size bytes of the transmitted IV.

Telling 720 from 4304 on a stream: the nsca daemon only recognises a legacy packet when the
connection closes after exactly 720 bytes, so it drops a legacy client that sends more than one
result.  We decide once per connection, as soon as 720 bytes have arrived: if the first 720
decrypted bytes carry version 3 and a CRC32 that matches over exactly those 720 bytes, the
connection is legacy; otherwise it is v3.  A v3 packet passes that test only if its CRC field
happens to equal the CRC of its first 720 bytes (chance 2**-32), and a single client never mixes
sizes, so no configuration flag is needed.  Every later packet on the connection has that size and
is checked in full (version, CRC, age).
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Callable, Sequence

from attrs import define, field, frozen
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.decrepit.ciphers.modes import CFB8
from cryptography.hazmat.primitives.ciphers import (
    BlockCipherAlgorithm,
    Cipher,
    CipherContext,
    algorithms,
)

IV_SIZE = 128
INIT_PACKET_SIZE = IV_SIZE + 4
PACKET_SIZE = 4304
LEGACY_PACKET_SIZE = 720
PACKET_VERSION = 3
METHOD_NONE = 0
METHOD_XOR = 1

_HEADER = struct.Struct(">hxxIIh")  # version, pad, crc32, timestamp, return code
_VERSION = struct.Struct(">h")
_CRC_SLICE = slice(4, 8)
_HOST_AT, _HOST_LEN = 14, 64
_SERVICE_AT, _SERVICE_LEN = 78, 128
_OUTPUT_AT = 206
_OUTPUT_LEN = {PACKET_SIZE: 4096, LEGACY_PACKET_SIZE: 512}
# The header and both names, as one unpack.
_FRONT = struct.Struct(f">hxxIIh{_HOST_LEN}s{_SERVICE_LEN}s")
# Method 1 decodes the plugin output this many bytes at a time, up to its NUL; the
# first step goes with the header and the names.
_OUTPUT_STEP = 256
_FIRST_XOR = _OUTPUT_AT + _OUTPUT_STEP


class NSCAError(Exception):
    """A client sent bytes the intake rejects; `reason` says what and why.

    `results` holds the valid results decoded from the same `feed` call before the bad packet,
    so the caller can still deliver them ("lose nothing else").
    """

    def __init__(self, reason: str, results: Sequence[CheckResult] = (), *,
                 kind: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.results = tuple(results)
        # One word for what was wrong (a metrics label): version, crc, stale,
        # future, garbage, or invalid for input after an earlier error.
        self.kind = kind


@frozen
class CheckResult:
    """One passive check result; `service` is empty for a host check."""

    host: str
    service: str
    code: int
    output: str
    timestamp: int

    @property
    def is_host_check(self) -> bool:
        return self.service == ""


@frozen
class _Mcrypt:
    name: str
    algorithm: Callable[[bytes], BlockCipherAlgorithm]
    key_size: int
    block_size: int


def _des(key: bytes) -> BlockCipherAlgorithm:
    # EDE with K1 = K2 = K3 is single DES; cryptography deprecates 8-byte TripleDES keys.
    return TripleDES(key * 3)


# mcrypt ciphers that cryptography can run in CFB8.  CAST-128 (4) and Blowfish (8) exist in
# cryptography but OpenSSL refuses them in CFB8; the rest are not in cryptography at all.
_MCRYPT_METHODS: dict[int, _Mcrypt] = {
    2: _Mcrypt("des", _des, 8, 8),
    3: _Mcrypt("3des", TripleDES, 24, 8),
    14: _Mcrypt("rijndael-128", algorithms.AES, 32, 16),
}
_UNSUPPORTED_NAMES = {
    4: "cast-128", 5: "cast-256", 6: "xtea", 7: "3-way", 8: "blowfish", 9: "twofish",
    10: "loki97", 11: "rc2", 12: "arcfour", 15: "rijndael-192", 16: "rijndael-256",
    19: "wake", 20: "serpent", 22: "enigma", 23: "gost", 24: "safer-sk64", 25: "safer-sk128",
    26: "saferplus",
}


def supported_methods() -> tuple[int, ...]:
    """The NSCA encryption_method numbers this intake can decrypt."""
    return (METHOD_NONE, METHOD_XOR, *sorted(_MCRYPT_METHODS))


def check_method(method: int) -> None:
    """Raise ValueError naming `method` unless the intake can decrypt it (a start-up check)."""
    if method in (METHOD_NONE, METHOD_XOR):
        return
    spec = _MCRYPT_METHODS.get(method)
    supported = ", ".join(str(m) for m in supported_methods())
    if spec is None:
        name = _UNSUPPORTED_NAMES.get(method)
        what = f"{method} ({name})" if name else str(method)
        raise ValueError(
            f"NSCA encryption method {what} is not supported; supported: {supported}"
        )
    try:
        _mcrypt_decryptor(spec, b"", bytes(IV_SIZE))
    except Exception as e:  # an OpenSSL build without the cipher
        raise ValueError(
            f"NSCA encryption method {method} ({spec.name}) is not available here: {e}"
        ) from e


def _mcrypt_decryptor(spec: _Mcrypt, password: bytes, iv: bytes) -> CipherContext:
    key = password[: spec.key_size].ljust(spec.key_size, b"\0")
    cipher = Cipher(spec.algorithm(key), CFB8(iv[: spec.block_size]))
    return cipher.decryptor()


def _to_bytes(value: str | bytes) -> bytes:
    # C strings: the password ends at its first NUL, whatever the config said.
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return raw.split(b"\0", 1)[0]


def _check_iv(iv: bytes) -> None:
    if len(iv) != IV_SIZE:
        raise ValueError(f"NSCA IV must be {IV_SIZE} bytes, not {len(iv)}")


def make_init_packet(iv: bytes, timestamp: int) -> bytes:
    """The 132-byte packet the server sends first: the IV, then the timestamp as uint32."""
    _check_iv(iv)
    return bytes(iv) + struct.pack(">I", timestamp & 0xFFFFFFFF)


def xor_pad(iv: bytes, password: bytes, size: int) -> bytes:
    """The XOR (method 1) keystream for one packet: IV and password, each repeated from 0."""
    ivs = (iv * (size // len(iv) + 1))[:size]
    if not password:
        return ivs
    pws = (password * (size // len(password) + 1))[:size]
    return _xor(ivs, pws)


def _xor(a: bytes, b: bytes) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "big") ^ int.from_bytes(b[:n], "big")).to_bytes(n, "big")


def packet_crc(packet: bytes) -> int:
    """CRC32 of a plaintext packet computed as nsca does, with the CRC field zeroed."""
    view = memoryview(packet)
    return zlib.crc32(view[8:], zlib.crc32(b"\0\0\0\0", zlib.crc32(view[:4])))


# (version, crc, computed crc, timestamp, return code, host, service, output) of a packet.
PacketFields = tuple[int, int, int, int, int, str, str, str]
Unpack = Callable[[bytes | bytearray, int, bytes | None], list[PacketFields]]


def unpack_py(buffer: bytes | bytearray, size: int, pad: bytes | None) -> list[PacketFields]:
    """The fields of each whole `size`-byte packet at the start of `buffer`, XORed
    with `pad` first if given (method 1): the pure-Python twin of the C
    extension's `unpack` (hub/intake/_nsca.c), used when that was not built."""
    if size not in _OUTPUT_LEN:
        raise ValueError(f"packet size {size} is neither {PACKET_SIZE} nor {LEGACY_PACKET_SIZE}")
    if pad is not None and len(pad) < size:
        raise ValueError(f"XOR pad of {len(pad)} bytes for {size}-byte packets")
    packets = []
    for at in range(0, len(buffer) - size + 1, size):
        raw = bytes(buffer[at : at + size])
        if pad is None:
            plain, computed = raw, packet_crc(raw)
        else:
            plain, computed = _unxor_packet(raw, pad)
        version, crc, timestamp, code, host, service = _FRONT.unpack_from(plain)
        output = plain[_OUTPUT_AT : _OUTPUT_AT + _OUTPUT_LEN[size] - 1]
        packets.append((version, crc, computed, timestamp, code, _c_string(host, _HOST_LEN),
                        _c_string(service, _SERVICE_LEN), _c_string(output, len(output) + 1)))
    return packets


def _c_string(raw: bytes, size: int) -> str:
    # Like the daemon's strncpy(dst, src, size - 1): at most size - 1 bytes, up to the NUL.
    return raw[: size - 1].split(b"\0", 1)[0].decode("utf-8", "replace")


@functools.lru_cache(maxsize=256)
def _pad_int(pad: bytes, start: int, end: int) -> int:
    # A connection's pad is the same for every packet: its slices are kept as ints.
    return int.from_bytes(pad[start:end], "big")


@functools.lru_cache(maxsize=64)
def _crc_constant(pad: bytes, size: int) -> int:
    return packet_crc(pad[:size]) ^ packet_crc(bytes(size))


def _unxor(raw: bytes, pad: bytes, start: int, end: int) -> bytes:
    """`raw[start:end]` XORed with the pad."""
    key = _pad_int(pad, start, end)
    return (int.from_bytes(raw[start:end], "big") ^ key).to_bytes(end - start, "big")


def _unxor_packet(raw: bytes, pad: bytes) -> tuple[bytes, int]:
    """Method 1 without XORing the whole 4304 bytes: the plaintext up to the end
    of the plugin output (the header, names and the output's first step in one
    XOR, then in steps up to its NUL), and the packet's CRC computed from the
    ciphertext. CRC-32 is affine: crc(c ^ k) = crc(c) ^ crc(k) ^ crc(0...0) for
    strings of one length, and the last two are constants of the connection."""
    size = len(raw)
    end = _FIRST_XOR
    plain = _unxor(raw, pad, 0, end)
    limit = _OUTPUT_AT + _OUTPUT_LEN[size]
    if b"\0" not in plain[_OUTPUT_AT:]:
        while end < limit:
            step = min(end + _OUTPUT_STEP, limit)
            part = _unxor(raw, pad, end, step)
            plain += part
            end = step
            if b"\0" in part:
                break
    return plain, packet_crc(raw) ^ _crc_constant(pad, size)


def _compiled() -> Unpack | None:
    try:
        from hub.intake._nsca import unpack as compiled
    except ImportError:  # installed without a C compiler: the pure-Python twin does the same
        return None
    return compiled  # type: ignore[no-any-return]


unpack_c = _compiled()
unpack: Unpack = unpack_c or unpack_py


@define(eq=False)
class NSCADecoder:
    """Turns one connection's bytes (after our init packet) into check results.

    `now` gives the current time for the age check; `max_age` 0 disables it.  After the first
    NSCAError the decoder refuses further input: the connection is to be closed.  `unpack`
    is the C extension's when it was built (`unpack_py` otherwise, or when passed).
    """

    method: int
    password: bytes = field(converter=_to_bytes, repr=False)
    iv: bytes = field(validator=lambda _i, _a, v: _check_iv(v))
    now: Callable[[], float]
    max_age: int = 30
    unpack: Unpack = field(default=unpack, repr=False)
    _buffer: bytearray = field(init=False, factory=bytearray)
    _stream: CipherContext | None = field(init=False, default=None)
    _pad: bytes | None = field(init=False, default=None)
    _packet_size: int | None = field(init=False, default=None)
    _failed: str | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        check_method(self.method)
        if self.method == METHOD_XOR:
            self._pad = xor_pad(self.iv, self.password, PACKET_SIZE)
        elif self.method != METHOD_NONE:
            spec = _MCRYPT_METHODS[self.method]
            self._stream = _mcrypt_decryptor(spec, self.password, self.iv)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held back until more data comes."""
        return len(self._buffer)

    @property
    def packet_size(self) -> int | None:
        """4304 or 720 once the connection's packet size is known."""
        return self._packet_size

    def feed(self, data: bytes | memoryview) -> list[CheckResult]:
        """Take more bytes; return every result they complete, or raise NSCAError."""
        if self._failed is not None:
            raise NSCAError(f"input after an earlier error ({self._failed})")
        # CFB8 is a byte stream across packet boundaries, so we decrypt as bytes arrive; XOR
        # restarts per packet and is applied when a packet is taken. The buffer grows in
        # place: `self._buffer +=` would run attrs' on_setattr hooks on every read.
        buffer = self._buffer
        buffer += self._stream.update(data) if self._stream is not None else data
        results: list[CheckResult] = []
        try:
            size = self._packet_size or self._first_size()
            if size is None:
                return results
            whole = len(buffer) - len(buffer) % size
            if whole:
                packets = self.unpack(buffer, size, self._pad)
                del buffer[:whole]
                for fields in packets:
                    results.append(self._result(*fields))
            self._check_started()
        except NSCAError as e:
            self._failed = e.reason
            raise NSCAError(e.reason, results, kind=e.kind) from None
        return results

    def _plain(self, size: int) -> bytes:
        chunk = bytes(self._buffer[:size])
        return chunk if self._pad is None else _unxor(chunk, self._pad, 0, size)

    def _check_started(self) -> None:
        """A packet not all here yet: its version is checked as soon as two bytes
        are in, so garbage is refused without waiting."""
        if len(self._buffer) >= 2:
            (version,) = _VERSION.unpack(self._plain(2))
            if version != PACKET_VERSION:
                raise _version_error(version)

    def _first_size(self) -> int | None:
        """The connection's packet size, decided once 720 bytes are in (see the module
        docstring); None until then."""
        self._check_started()
        if len(self._buffer) < LEGACY_PACKET_SIZE:
            return None
        head = self._plain(LEGACY_PACKET_SIZE)
        legacy = packet_crc(head) == _HEADER.unpack_from(head)[1]
        self._packet_size = LEGACY_PACKET_SIZE if legacy else PACKET_SIZE
        return self._packet_size

    def _result(self, version: int, crc: int, computed: int, timestamp: int, code: int,
                host: str, service: str, output: str) -> CheckResult:
        """One packet's fields checked: version, CRC, age and a host name."""
        if version != PACKET_VERSION:
            raise _version_error(version)
        if crc != computed:
            raise NSCAError(
                f"bad CRC32 {crc:#010x} (computed {computed:#010x}); "
                "wrong password or encryption method?",
                kind="crc",
            )
        if self.max_age > 0:
            now = int(self.now())
            age = now - timestamp
            if age > self.max_age:
                raise NSCAError(
                    f"stale packet: timestamp {timestamp} is {age} s before now {now} "
                    f"(max age {self.max_age} s)",
                    kind="stale",
                )
            if -age > self.max_age:
                raise NSCAError(
                    f"packet from the future: timestamp {timestamp} is {-age} s after now "
                    f"{now} (max age {self.max_age} s)",
                    kind="future",
                )
        if not host:
            raise NSCAError("garbage packet: empty host name", kind="garbage")
        return CheckResult(host, service, code, output, timestamp)


def _version_error(version: int) -> NSCAError:
    return NSCAError(
        f"bad packet version {version} (expected {PACKET_VERSION}); "
        "wrong password or encryption method?",
        kind="version",
    )


def format_command(result: CheckResult, now: int) -> str:
    """The external-command line nsca 2.10 writes for `result` at time `now`.

    nsca escapes backslash and newline in the plugin output only; host and service names go
    out verbatim.  We also turn a newline in a name into ``\\n``: send_nsca cannot produce one,
    and written raw it would inject a second command.
    """
    output = result.output.replace("\\", "\\\\").replace("\n", "\\n")
    host = result.host.replace("\n", "\\n")
    if result.is_host_check:
        return f"[{now}] PROCESS_HOST_CHECK_RESULT;{host};{result.code};{output}\n"
    service = result.service.replace("\n", "\\n")
    return f"[{now}] PROCESS_SERVICE_CHECK_RESULT;{host};{service};{result.code};{output}\n"
