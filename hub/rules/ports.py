"""Which port a node's forward gets, and what the forward's service is called.

Pure rules: the registry stores the leases, the tunnel binds them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Iterator

from attrs import define, field, frozen

WELL_KNOWN = {22: "ssh", 80: "http", 443: "https"}
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_NOT_LABELS = {"localhost"}
MAX_PORT = 65535  # a forward request's port is a uint32 on the wire (RFC 4254)
# How long a port found held by another program is passed over for new leases.
BUSY_FOR = 300.0


def is_label(bind_address: str) -> bool:
    """A bind address like `http` in `-R http:0:localhost:80` names a service.

    Addresses, `localhost`, `*` and empty strings do not."""
    if bind_address.lower() in _NOT_LABELS or not _LABEL.match(bind_address.lower()):
        return False
    try:
        ipaddress.ip_address(bind_address)
    except ValueError:
        return True
    return False


def service_name(bind_address: str, requested_port: int) -> str:
    """The service a `tcpip-forward` request stands for (see docs/operator-guide.md)."""
    if is_label(bind_address):
        return bind_address.lower()
    if requested_port == 0:
        return "ssh"
    return WELL_KNOWN.get(requested_port, f"port-{requested_port}")


def lease_port(low: int, high: int, free: Iterable[int], avoid: Collection[int] = (),
               previous: int | None = None, busy: Collection[int] = ()) -> int | None:
    """The port a node's service gets in [low, high], or None when none is left.

    Leases are sticky: the node's `previous` port for the service while it is
    in the range and not in `avoid` (ports another program was found holding
    just now, for this lease). Else the first of `free` (the range's unleased
    ports, lowest first) that is in the range, not avoided and not `busy`
    (ports found held lately, for any lease: see `BusyPorts`). `free` is read only
    as far as needed, so the registry can compute it lazily from its index.
    """
    if previous is not None and low <= previous <= high and previous not in avoid:
        return previous
    return next((port for port in free
                 if low <= port <= high and port not in avoid and port not in busy), None)


@define
class BusyPorts:
    """Ports of the range that another program was found holding (EADDRINUSE on
    listen), passed over by new leases for `held_for` seconds.

    Leases are chosen lowest first, so without this every new lease would try the
    lowest port some other program holds (an outgoing connection's ephemeral port:
    Linux's default 32768-60999 overlaps the hub's 49152-65535), fail to listen,
    and lease again. A node's own sticky port is still tried: the program may have
    let it go. After `held_for` a port is tried again.
    """

    held_for: float = BUSY_FOR
    _found: dict[int, float] = field(factory=dict)

    def found(self, port: int, now: float) -> bool:
        """Remember `port` as held at `now`; True if it was not known to be."""
        new = now - self._found.get(port, now - self.held_for) >= self.held_for
        self._found[port] = now
        return new

    def recent(self, now: float) -> frozenset[int]:
        """The ports found held in the last `held_for` seconds."""
        for port in [p for p, at in self._found.items() if now - at >= self.held_for]:
            del self._found[port]
        return frozenset(self._found)


def free_ports(leased: Collection[int], low: int, high: int) -> Iterator[int]:
    """The ports of [low, high] not in `leased`, lowest first."""
    return (port for port in range(low, high + 1) if port not in leased)


def choose_port(taken: Collection[int], low: int, high: int,
                avoid: Collection[int] = ()) -> int | None:
    """The lowest port in [low, high] neither leased nor known to be unusable
    (`lease_port` for a service that holds no lease yet)."""
    return lease_port(low, high, free_ports(taken, low, high), avoid)


@frozen
class ForwardCaps:
    """How many forwards a node may hold. A pending node is anyone with the
    shared Call Home Password, so it gets a few ports, counted by lease: a
    cancelled forward keeps its lease, and a new service must not take another."""

    pending: int = 3
    approved: int = 16

    def refusal(self, state: str, live: int, leased: Collection[str], service: str
                ) -> str | None:
        """Why a node in `state` with `live` forwards and leases for the `leased`
        services may not forward `service` now, or None if it may."""
        cap = self.pending if state == "pending" else self.approved
        if live >= cap:
            return f"{state} nodes may hold at most {cap} forwards"
        if state == "pending" and service not in leased and len(leased) >= cap:
            return (f"pending nodes may hold at most {cap} port leases "
                    f"({', '.join(sorted(leased))}); approve it for more")
        return None
