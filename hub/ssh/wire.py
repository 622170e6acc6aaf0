"""Byte-exact SSH payloads of port forwarding (RFC 4254 section 7), without I/O.

The `tcpip-forward` / `cancel-tcpip-forward` global request data, the reply
to a port-0 forward, and the `forwarded-tcpip` / `direct-tcpip` channel-open
data. Addresses stay bytes: OpenSSH matches a `forwarded-tcpip` open against
its forwards by the exact bind string it sent. Anything malformed raises
`WireError`, which says what was wrong.
"""

from __future__ import annotations

import struct

from attrs import field, frozen

_UINT32 = struct.Struct(">L")
UINT32_MAX = 0xFFFFFFFF


class WireError(ValueError):
    """A malformed SSH payload; the message names the field and the fault."""


def _check_uint32(instance: object, attribute: object, value: int) -> None:
    if not 0 <= value <= UINT32_MAX:
        raise WireError(f"{getattr(attribute, 'name', 'value')} {value} is not a uint32")


def _check_string(instance: object, attribute: object, value: bytes) -> None:
    if len(value) > UINT32_MAX:
        raise WireError(f"{getattr(attribute, 'name', 'value')} is too long for an SSH string")


@frozen
class ForwardRequest:
    """`tcpip-forward` and `cancel-tcpip-forward` data: string bind address, uint32 port."""

    bind: bytes = field(validator=_check_string)
    port: int = field(validator=_check_uint32)


@frozen
class TcpipOpen:
    """`forwarded-tcpip` and `direct-tcpip` open data: where to, and who asks.

    For `forwarded-tcpip` `host`/`port` are the forward as the device asked for
    it; for `direct-tcpip` they are the destination the client wants."""

    host: bytes = field(validator=_check_string)
    port: int = field(validator=_check_uint32)
    origin: bytes = field(validator=_check_string)
    origin_port: int = field(validator=_check_uint32)


class _Reader:
    """Takes fields off the front of a payload, naming the one that is short."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = memoryview(data)
        self.at = 0
        self.what = what

    def _take(self, n: int, name: str) -> bytes:
        if len(self.data) - self.at < n:
            raise WireError(f"{self.what}: truncated {name}")
        chunk = bytes(self.data[self.at:self.at + n])
        self.at += n
        return chunk

    def uint32(self, name: str) -> int:
        return int(_UINT32.unpack(self._take(4, name))[0])

    def string(self, name: str) -> bytes:
        return self._take(self.uint32(f"{name} length"), name)

    def end(self) -> None:
        extra = len(self.data) - self.at
        if extra:
            raise WireError(f"{self.what}: {extra} trailing bytes")


def _string(value: bytes) -> bytes:
    return _UINT32.pack(len(value)) + value


def pack_forward_request(request: ForwardRequest) -> bytes:
    return _string(request.bind) + _UINT32.pack(request.port)


def unpack_forward_request(data: bytes) -> ForwardRequest:
    reader = _Reader(data, "tcpip-forward request")
    request = ForwardRequest(reader.string("bind address"), reader.uint32("port"))
    reader.end()
    return request


def pack_allocated_port(port: int) -> bytes:
    """The REQUEST_SUCCESS data answering a port-0 `tcpip-forward`."""
    _check_uint32(None, None, port)
    return _UINT32.pack(port)


def unpack_allocated_port(data: bytes) -> int:
    reader = _Reader(data, "tcpip-forward reply")
    port = reader.uint32("port")
    reader.end()
    return port


def pack_tcpip_open(data: TcpipOpen) -> bytes:
    return (_string(data.host) + _UINT32.pack(data.port)
            + _string(data.origin) + _UINT32.pack(data.origin_port))


def unpack_tcpip_open(data: bytes) -> TcpipOpen:
    reader = _Reader(data, "tcpip channel open")
    opened = TcpipOpen(reader.string("host"), reader.uint32("port"),
                       reader.string("originator address"), reader.uint32("originator port"))
    reader.end()
    return opened


def text(value: bytes, name: str) -> str:
    """A field that must be text (a node name, say), decoded strictly."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{name}: bad UTF-8") from None
