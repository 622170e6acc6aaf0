"""The forwarding payloads of hub.ssh.wire: byte-exact both ways, and every malformation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.conch.ssh import common

from hub.ssh.wire import (
    ForwardRequest,
    TcpipOpen,
    WireError,
    pack_allocated_port,
    pack_forward_request,
    pack_tcpip_open,
    text,
    unpack_allocated_port,
    unpack_forward_request,
    unpack_tcpip_open,
)

uint32 = st.integers(0, 2**32 - 1)
strings = st.binary(max_size=300)


@given(strings, uint32)
def test_forward_request_round_trip(bind: bytes, port: int) -> None:
    request = ForwardRequest(bind, port)
    packed = pack_forward_request(request)
    assert packed == common.NS(bind) + struct.pack(">L", port)  # what Conch would send
    assert unpack_forward_request(packed) == request


@given(uint32)
def test_allocated_port_round_trip(port: int) -> None:
    assert unpack_allocated_port(pack_allocated_port(port)) == port


@given(strings, uint32, strings, uint32)
def test_tcpip_open_round_trip(host: bytes, port: int, origin: bytes, origin_port: int) -> None:
    opened = TcpipOpen(host, port, origin, origin_port)
    packed = pack_tcpip_open(opened)
    assert packed == (common.NS(host) + struct.pack(">L", port)
                      + common.NS(origin) + struct.pack(">L", origin_port))
    assert unpack_tcpip_open(packed) == opened


def test_known_bytes() -> None:
    # `ssh -R http:0:localhost:80`: bind "http", port 0.
    assert pack_forward_request(ForwardRequest(b"http", 0)) == b"\0\0\0\x04http\0\0\0\0"
    assert unpack_forward_request(b"\0\0\0\0\0\0\x01\xbb") == ForwardRequest(b"", 443)
    assert pack_allocated_port(50000) == b"\0\0\xc3\x50"
    assert pack_tcpip_open(TcpipOpen(b"localhost", 22, b"203.0.113.9", 51000)) == (
        b"\0\0\0\x09localhost\0\0\0\x16\0\0\0\x0b203.0.113.9\0\0\xc7\x38")


@pytest.mark.parametrize(("data", "message"), [
    (b"", "truncated bind address length"),
    (b"\0\0", "truncated bind address length"),
    (b"\0\0\0\x05abc", "truncated bind address"),
    (b"\0\0\0\0\0\0", "truncated port"),
    (b"\0\0\0\0\0\0\0\x16!", "1 trailing bytes"),
])
def test_malformed_forward_request(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message) as raised:
        unpack_forward_request(data)
    assert isinstance(raised.value, ValueError)
    assert str(raised.value).startswith("tcpip-forward request: ")


@pytest.mark.parametrize(("data", "message"), [
    (b"\0\0\x01", "truncated port"),
    (b"\0\0\x01\0\0", "1 trailing bytes"),
])
def test_malformed_allocated_port(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        unpack_allocated_port(data)


GOOD_OPEN = pack_tcpip_open(TcpipOpen(b"node", 22, b"10.0.0.1", 4000))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "truncated host length"),
    (b"\0\0\0\x04no", "truncated host"),
    (b"\0\0\0\x04node\0\0", "truncated port"),
    (b"\0\0\0\x04node\0\0\0\x16", "truncated originator address length"),
    (b"\0\0\0\x04node\0\0\0\x16\0\0\0\x09short", "truncated originator address"),
    (GOOD_OPEN[:-1], "truncated originator port"),
    (GOOD_OPEN + b"\0\0", "2 trailing bytes"),
])
def test_malformed_tcpip_open(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        unpack_tcpip_open(data)


def test_text_fields_must_be_utf8() -> None:
    assert text("café".encode(), "host") == "café"
    with pytest.raises(WireError, match="host: bad UTF-8"):
        text(b"\xff\xfe", "host")


@pytest.mark.parametrize("port", [-1, 2**32])
def test_ports_outside_uint32_are_refused(port: int) -> None:
    with pytest.raises(WireError, match="port"):
        ForwardRequest(b"", port)
    with pytest.raises(WireError, match="origin_port"):
        TcpipOpen(b"", 0, b"", port)
    with pytest.raises(WireError):
        pack_allocated_port(port)
