"""Fuzz targets: what a peer can send to each parser, as hypothesis strategies,
and a check per target that fails on anything but the parser's own error.

The tests (tests/test_fuzz_*.py) run each with a few examples; bench/fuzz.py
runs them for as long as it is told. A target raises (AssertionError or the
parser's unexpected exception) when it finds a bug: a traceback in the log,
an exception out of a parser, a connection left open after a protocol error.
"""

from __future__ import annotations

import gc
import struct
from typing import Any

from fuzz_peers import (
    VERSION,
    HostileServer,
    LoggedInPeer,
    RawPeer,
    clear_packet,
    next_address,
    watching,
)
from hypothesis import strategies as st
from twisted.conch.ssh import connection, transport
from twisted.conch.ssh.common import NS
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport

from hub.access.device_client import DeviceClientTransport
from hub.intake.nsca import (
    LEGACY_PACKET_SIZE,
    METHOD_NONE,
    PACKET_SIZE,
    NSCADecoder,
    NSCAError,
    packet_crc,
    supported_methods,
    unpack,
    unpack_py,
)
from hub.netconf.preamble import PreambleError, PreambleParser, authenticate
from hub.rules.chooser import Chooser, Entry
from hub.rules.logins import may_reach, parse_login

# -- SSH payloads ---------------------------------------------------------------

u32 = st.one_of(st.sampled_from([0, 1, 2, 7, 0x7FFFFFFF, 0xFFFFFFFF]),
                st.integers(0, 0xFFFFFFFF))
junk = st.binary(max_size=64)


def _ns(names: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(names), st.binary(max_size=24)).map(NS)


def _truncated(payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Whole, cut short, or with junk after it."""
    return st.tuples(payload, st.integers(0, 80), junk).map(
        lambda t: t[0] if t[1] % 3 == 0 else (t[0][:t[1]] if t[1] % 3 == 1 else t[0] + t[2]))


def _message(number: int | st.SearchStrategy[int], body: st.SearchStrategy[bytes]
             ) -> st.SearchStrategy[bytes]:
    numbers = st.just(number) if isinstance(number, int) else number
    return st.tuples(numbers, _truncated(body)).map(lambda t: bytes((t[0],)) + t[1])


_NAME_LISTS = st.lists(_ns([b"curve25519-sha256", b"ssh-ed25519",
                            b"chacha20-poly1305@openssh.com", b"hmac-sha2-256", b"none",
                            b"kex-strict-c-v00@openssh.com", b""]),
                       min_size=10, max_size=10).map(b"".join)
kexinit_body = st.tuples(st.binary(min_size=16, max_size=16), _NAME_LISTS,
                         st.sampled_from([b"\x00", b"\x01"]), u32).map(
    lambda t: t[0] + t[1] + t[2] + struct.pack(">L", t[3]))

transport_message = st.one_of(
    _message(transport.MSG_KEXINIT, kexinit_body),
    _message(st.sampled_from([transport.MSG_NEWKEYS, transport.MSG_IGNORE,
                              transport.MSG_DEBUG, transport.MSG_UNIMPLEMENTED,
                              transport.MSG_DISCONNECT, transport.MSG_SERVICE_REQUEST,
                              transport.MSG_SERVICE_ACCEPT, transport.MSG_EXT_INFO]),
             st.one_of(junk, _ns([b"ssh-userauth", b"ssh-connection"]))),
    _message(st.integers(30, 34), st.one_of(junk, st.binary(min_size=32, max_size=32).map(NS))),
    _message(st.integers(0, 255), junk),
)

userauth_message = st.one_of(
    _message(50, st.tuples(_ns([b"cms", b"alice", b"alice:site-a:2"]),
                           _ns([b"ssh-connection"]),
                           _ns([b"none", b"password", b"publickey",
                                b"keyboard-interactive"]),
                           junk).map(b"".join)),
    _message(st.sampled_from([50, 51, 52, 53, 60, 61]), junk),
)

_CHANNEL_TYPES = [b"session", b"direct-tcpip", b"forwarded-tcpip", b"x11",
                  b"auth-agent@openssh.com", b"direct-streamlocal@openssh.com"]
_TCPIP = st.tuples(_ns([b"localhost", b"127.0.0.1", b"site-a", b""]), u32,
                   _ns([b"127.0.0.1"]), u32).map(
    lambda t: t[0] + struct.pack(">L", t[1]) + t[2] + struct.pack(">L", t[3]))
channel_open = _message(connection.MSG_CHANNEL_OPEN, st.tuples(
    _ns(_CHANNEL_TYPES), u32, u32, u32, st.one_of(_TCPIP, junk)).map(
    lambda t: t[0] + struct.pack(">3L", t[1], t[2], t[3]) + t[4]))

_REQUESTS = [b"exec", b"shell", b"pty-req", b"env", b"subsystem", b"window-change",
             b"signal", b"exit-status", b"keepalive@openssh.com"]
_REQUEST_DATA = st.one_of(
    _ns([b"register", b"register site-b", b"register 'x\n'", b"ls", b"\"", b""]), junk)
channel_request = _message(connection.MSG_CHANNEL_REQUEST, st.tuples(
    st.one_of(st.sampled_from([0, 1]), u32), _ns(_REQUESTS), st.sampled_from([b"\x00", b"\x01"]),
    _REQUEST_DATA).map(lambda t: struct.pack(">L", t[0]) + t[1] + t[2] + t[3]))

_GLOBALS = [b"tcpip-forward", b"cancel-tcpip-forward", b"keepalive@openssh.com",
            b"no-more-sessions@openssh.com", b"hostkeys-prove-00@openssh.com"]
global_request = _message(connection.MSG_GLOBAL_REQUEST, st.tuples(
    _ns(_GLOBALS), st.sampled_from([b"\x00", b"\x01"]),
    st.one_of(st.tuples(_ns([b"", b"localhost", b"0.0.0.0"]), u32).map(
        lambda t: t[0] + struct.pack(">L", t[1])), junk)).map(b"".join))

channel_message = _message(st.integers(91, 100), st.tuples(
    st.one_of(st.sampled_from([0, 1]), u32), junk).map(lambda t: struct.pack(">L", t[0]) + t[1]))

connection_message = st.one_of(channel_open, channel_request, global_request, channel_message,
                               _message(st.integers(50, 127), junk))

# A session opened first makes the channel requests and data reach the registrar.
SESSION_OPEN = bytes((connection.MSG_CHANNEL_OPEN,)) + NS(b"session") + struct.pack(
    ">3L", 0, 65536, 32768)


def _split(message: bytes) -> tuple[int, bytes]:
    return message[0], message[1:]


# -- SSH targets ----------------------------------------------------------------

def check_ssh_before_kex(factory: Any, messages: list[bytes]) -> None:
    """The hub's server transport, before key exchange: clear packets."""
    with watching() as watch:
        peer = RawPeer(factory)
        try:
            peer.send(*messages)
        finally:
            peer.close()
    assert watch.tracebacks() == [], watch.tracebacks()


def check_ssh_framing(factory: Any, data: bytes) -> None:
    """The hub's server transport, raw bytes after the version line."""
    with watching() as watch:
        peer = RawPeer(factory)
        try:
            peer.send(version=VERSION)
            peer.write(data)
        finally:
            peer.close()
    assert watch.tracebacks() == [], watch.tracebacks()


def check_ssh_client_before_kex(messages: list[bytes]) -> None:
    """The hub's SSH client (to devices, and NETCONF call home) before key
    exchange: what a hostile device sends it."""
    clock = MemoryReactorClock()
    client = DeviceClientTransport(b"root", _client_key(), None, None, defer.Deferred(), clock)
    client.ready.addErrback(lambda _: None)
    with watching() as watch:
        client.makeConnection(StringTransport())
        data = VERSION + b"".join(clear_packet(i, m) for i, m in enumerate(messages))
        try:
            client.dataReceived(data)
        finally:
            client.connectionLost(None)
    assert watch.tracebacks() == [], watch.tracebacks()


_KEY: list[Any] = []


def _client_key() -> Any:
    if not _KEY:
        from memory_hub import new_key
        _KEY.append(new_key())
    return _KEY[0]


def check_ssh_after_kex(factory: Any, clock: Any, key: Any, user: bytes | None,
                        messages: list[bytes], session_first: bool = False) -> None:
    """Encrypted packets after key exchange: user auth (`user` None: a client
    that never authenticates) or, logged in, the connection layer."""
    with watching() as watch:
        peer = LoggedInPeer(factory, clock, key, user=user) if user else _unauthenticated(
            factory, clock)
        try:
            if session_first:
                peer.send(*_split(SESSION_OPEN))
            for message in messages:
                if peer.dropped:
                    break
                peer.send(*_split(message))
            clock.advance(1)  # the registrar's deferred refusals
            peer.pump.flush()
        finally:
            peer.close()
        gc.collect()  # a failure left in a Deferred is logged when collected
    assert watch.tracebacks() == [], watch.tracebacks()
    if watch.protocol_errors(peer.server):
        assert peer.dropped


def check_ssh_client_after_login(messages: list[bytes]) -> None:
    """The hub's SSH client logged in to a hostile device, which then sends
    connection-layer messages (channel opens, requests, global requests)."""
    with watching() as watch:
        device = HostileServer()
        try:
            for message in messages:
                if device.dropped:
                    break
                device.send(*_split(message))
            device.clock.advance(1)
            device.pump.flush()
        finally:
            device.close()
        gc.collect()
    assert watch.tracebacks() == [], watch.tracebacks()
    if watch.protocol_errors(device.client):
        assert device.dropped


def _unauthenticated(factory: Any, clock: Any) -> LoggedInPeer:
    peer = LoggedInPeer.__new__(LoggedInPeer)
    from memory_hub import connect_client
    peer.server, peer.client, peer.pump = connect_client(factory, clock, None,
                                                         peer=next_address())
    peer.replies = []
    return peer


# -- parsers ---------------------------------------------------------------------

chunks = st.lists(st.binary(max_size=800), max_size=8)


def check_nsca(method: int, password: bytes, iv: bytes, data: list[bytes]) -> None:
    """The decoder as the hub runs it (the C extension's unpacking when built)
    takes `data` chunk by chunk with no error but NSCAError, and gives the
    same results and errors as with the pure-Python unpacking."""
    assert _nsca_outcomes(method, password, iv, data, unpack) == _nsca_outcomes(
        method, password, iv, data, unpack_py)


def _nsca_outcomes(method: int, password: bytes, iv: bytes, data: list[bytes],
                   unpacker: Any) -> list[Any]:
    decoder = NSCADecoder(method, password, iv, now=lambda: 1_700_000_000.0, max_age=0,
                          unpack=unpacker)
    outcomes: list[Any] = []
    for chunk in data:
        try:
            outcomes.append(decoder.feed(chunk))
        except NSCAError as e:
            outcomes.append((e.kind, e.reason, e.results))
            break
    return outcomes


nsca_methods = st.sampled_from(supported_methods())


def _nsca_packet(t: tuple[int, int, int, bytes, bytes, bytes, bool, list[tuple[int, int]]]
                 ) -> bytes:
    version, stamp, code, host, service, output, legacy, flips = t
    size = LEGACY_PACKET_SIZE if legacy else PACKET_SIZE
    body = bytearray(struct.pack(">hxxIIh", version, 0, stamp, code)
                     + host.ljust(64, b"\0")[:64] + service.ljust(128, b"\0")[:128]
                     + output)
    body = body.ljust(size, b"\0")[:size]
    struct.pack_into(">I", body, 4, packet_crc(bytes(body)))
    for at, value in flips:  # damage after the CRC: length, NULs, fields
        body[at % size] = value
    return bytes(body)


nsca_packet = st.tuples(
    st.sampled_from([3, 2, -1]), u32, st.integers(-32768, 32767), st.binary(max_size=70),
    st.binary(max_size=130), st.binary(max_size=600), st.booleans(),
    st.lists(st.tuples(st.integers(0, PACKET_SIZE), st.integers(0, 255)), max_size=3),
).map(_nsca_packet)
nsca_plain_stream = st.tuples(st.lists(nsca_packet, min_size=1, max_size=3),
                              st.lists(st.integers(1, 5000), max_size=4)).map(
    lambda t: _chop(b"".join(t[0]), t[1]))


def _chop(data: bytes, cuts: list[int]) -> list[bytes]:
    out, at = [], 0
    for cut in sorted(cuts):
        out.append(data[at:cut])
        at = max(at, cut)
    return [*out, data[at:]]


NSCA_PLAIN = METHOD_NONE

_PREAMBLE_LINES = st.lists(st.one_of(
    st.sampled_from([b"MSG-ID:DEVICE-CONN-INFO", b"MSG-VER:V1", b"DEVICE-ID:site-a",
                     b"HOST-KEY:AAAA", b"HMAC:00", b"HOST-KEY:", b"\x00", b""]),
    st.binary(max_size=40)), max_size=6).map(lambda lines: b"\r\n".join(lines) + b"\r\n")
preamble_input = st.tuples(_PREAMBLE_LINES, st.sampled_from([b"", b"SSH-2.0-x\r\n", b"SSH-"]),
                           chunks).map(lambda t: [t[0] + t[1], *t[2]])


def check_preamble(data: list[bytes]) -> None:
    parser = PreambleParser(MemoryReactorClock())
    for chunk in data:
        try:
            result = parser.feed(chunk)
            if result is not None:
                if result.preamble is not None:
                    authenticate(result.preamble, {"site-a": "secret", "*": "other"})
                return
        except PreambleError:
            return


login_text = st.one_of(st.text(max_size=40), st.sampled_from(
    ["alice", "alice:", ":site", "alice:site-a:2", "a:b:c:d", "alice::2"]))


def check_login(name: str, patterns: list[str], node: str) -> None:
    try:
        parse_login(name)
    except UnauthorizedLogin:
        pass
    may_reach(tuple(patterns), node)


def check_chooser(entries: list[tuple[str, bool]], typed: list[bytes]) -> None:
    chooser = Chooser([Entry(name, online) for name, online in entries])
    chooser.menu()
    for data in typed:
        echo, decision = chooser.feed(data)
        assert isinstance(echo, bytes)
        if decision is not None:
            return


chooser_typed = st.lists(st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"1\r", b"q\n", b"\x1b[A", b"\x7f", b"\x03", b"\x04", b"99\r", b"\x1b"])),
    max_size=10)

