"""The `dial@callhomehub` channel open: a peer hub asks this hub to dial a node it holds.

Its type-specific data, byte for byte (RFC 4251 types): string node, string
service (empty: by port), uint32 port (0: by service), string originator
address, uint32 originator port.
"""

from __future__ import annotations

import struct

from attrs import frozen

from hub.ssh.wire import WireError
from hub.tunnel.dial import Target

DIAL = b"dial@callhomehub"


@frozen
class DialRequest:
    node: str
    target: Target  # a service name, or a port as an operator asked for it
    origin: str
    origin_port: int


def _string(value: bytes) -> bytes:
    return struct.pack(">L", len(value)) + value


def pack_dial(request: DialRequest) -> bytes:
    service, port = ((request.target, 0) if isinstance(request.target, str)
                     else ("", request.target))
    return (_string(request.node.encode()) + _string(service.encode())
            + struct.pack(">L", port) + _string(request.origin.encode())
            + struct.pack(">L", request.origin_port))


def unpack_dial(data: bytes) -> DialRequest:
    """The request in `data`; WireError naming what is wrong."""
    at = 0

    def take(n: int, what: str) -> bytes:
        nonlocal at
        if len(data) - at < n:
            raise WireError(f"dial request truncated in {what}")
        chunk = data[at:at + n]
        at += n
        return chunk

    def string(what: str) -> str:
        (n,) = struct.unpack(">L", take(4, what))
        try:
            return take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"dial request: {what} is not UTF-8") from None

    node = string("node")
    service = string("service")
    (port,) = struct.unpack(">L", take(4, "port"))
    origin = string("origin")
    (origin_port,) = struct.unpack(">L", take(4, "origin port"))
    if at != len(data):
        raise WireError("dial request has trailing bytes")
    if not node:
        raise WireError("dial request names no node")
    if bool(service) == bool(port) or port > 65535 or origin_port > 65535:
        raise WireError("dial request needs either a service or a port (1-65535)")
    return DialRequest(node, service or port, origin, origin_port)
