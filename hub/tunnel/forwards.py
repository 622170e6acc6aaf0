"""The forwards of one node session and what to do with a forward request: pure rules.

A device asks for `tcpip-forward (bind, port)`; the port it asks for is
virtual (0, or a service number). The table decides whether that request is
refused (a port that is no TCP port; a forward of the same bind and port, or
of the same service, that the session already has) or needs a port leased;
which forward a `cancel-tcpip-forward` means; and which forward a dial into
the device uses. `NodeTunnel` carries the decisions out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from attrs import Factory, define, field, frozen

from hub.rules.ports import MAX_PORT, service_name
from hub.ssh.wire import (
    UINT32_MAX,
    TcpipOpen,
    WireError,
    pack_allocated_port,
    pack_tcpip_open,
)

_ORIGIN = struct.Struct(">L")
Key = tuple[bytes, int]  # (bind, requested port): how the device names a forward


@frozen(eq=False)
class Forward:
    """One forward of a session; compared by identity (a forward cancelled and
    asked for again is a new one)."""

    service: str
    bind: bytes       # the bind string exactly as the device sent it
    requested: int    # the port the device asked for: 0, or a service number
    port: int         # the hub's real (leased) port
    # The forwarded-tcpip open data up to the originator: the same for every
    # connection (packed once, not per connection through TcpipOpen).
    _open_head: bytes = field(init=False, repr=False, default=Factory(
        lambda self: pack_tcpip_open(TcpipOpen(self.bind, self.channel_port, b"", 0))[:-8],
        takes_self=True))

    @property
    def key(self) -> Key:
        return (self.bind, self.requested)

    @property
    def channel_port(self) -> int:
        """The port put in forwarded-tcpip: what the device asked for, or the
        allocated one for port 0 (OpenSSH looks its forward up by both)."""
        return self.requested or self.port

    def open_data(self, origin: bytes = b"127.0.0.1", origin_port: int = 0) -> bytes:
        """forwarded-tcpip open data, as OpenSSH checks it against its forwards:
        pack_tcpip_open(TcpipOpen(bind, channel_port, origin, origin_port))."""
        if not 0 <= origin_port <= UINT32_MAX:
            raise WireError(f"origin_port {origin_port} is not a uint32")
        return self._open_head + _ORIGIN.pack(len(origin)) + origin + _ORIGIN.pack(origin_port)

    def reply(self) -> int | tuple[int, bytes]:
        """The answer to the request: port 0 gets the allocated port (OpenSSH
        prints it); a fixed port is a virtual service number and needs no data."""
        return (1, pack_allocated_port(self.port)) if self.requested == 0 else 1


@frozen
class Refused:
    """A request no forward can be made of."""

    why: str


@frozen
class Duplicate:
    """The service is forwarded already, under this or another bind and port.
    Its lease is the port that forward holds: refuse rather than move the node's
    port or share one listener between two targets (`-R 0:localhost:22 -R
    0:localhost:80` would send both targets' users to the first, and the
    device's ExitOnForwardFailure would never fire)."""

    service: str
    holder: Forward


@frozen
class Lease:
    """A new forward: lease a port for `service` and listen on it."""

    service: str
    bind: bytes
    requested: int

    def forward(self, port: int) -> Forward:
        return Forward(self.service, self.bind, self.requested, port)


Decision = Refused | Duplicate | Lease


@define
class ForwardTable:
    """The live forwards of one session, by the (bind, port) the device used."""

    _forwards: dict[Key, Forward] = field(factory=dict)

    def request(self, bind: bytes, port: int) -> Decision:
        if port > MAX_PORT:
            return Refused(f"port {port} is above {MAX_PORT}")
        service = service_name(bind.decode("utf-8", "replace"), port)
        existing = self._forwards.get((bind, port))
        if existing is not None:
            return Duplicate(existing.service, existing)
        holder = self.service_forward(service)
        if holder is not None:
            return Duplicate(service, holder)
        return Lease(service, bind, port)

    def add(self, forward: Forward) -> None:
        self._forwards[forward.key] = forward

    def cancel(self, bind: bytes, port: int) -> Forward | None:
        """Remove and return the forward a `cancel-tcpip-forward` names, if any.
        OpenSSH cancels a port-0 forward by the port it was allocated."""
        forward = self._forwards.get((bind, port)) or next(
            (f for f in self._forwards.values()
             if f.bind == bind and f.requested == 0 and f.port == port), None)
        if forward is not None:
            del self._forwards[forward.key]
        return forward

    def holds(self, forward: Forward) -> bool:
        """Whether `forward` is still live (not cancelled, not replaced)."""
        return self._forwards.get(forward.key) is forward

    def service_forward(self, service: str) -> Forward | None:
        """The forward of `service` (case-insensitive), if there is one."""
        service = service.lower()
        return next((f for f in self._forwards.values() if f.service == service), None)

    def port_forward(self, port: int) -> Forward | None:
        """The forward an operator means by a port number (`ssh -J`, `-W NODE:PORT`):
        the service that port names (22 ssh, 80 http, N port-N), else the forward
        the device asked for with that port."""
        return self.service_forward(service_name("", port)) or next(
            (f for f in self._forwards.values() if f.channel_port == port), None)

    def lookup(self, target: str | int) -> Forward | None:
        """A service name, or a port number as an operator gives it."""
        return self.port_forward(target) if isinstance(target, int) else (
            self.service_forward(target))

    def clear(self) -> list[Forward]:
        forwards, self._forwards = list(self._forwards.values()), {}
        return forwards

    def __iter__(self) -> Iterator[Forward]:
        return iter(list(self._forwards.values()))

    def __len__(self) -> int:
        return len(self._forwards)
