"""Releasing the port leases of pending nodes that never came back.

A pending node is anyone with the shared Call Home Password; its leases would
otherwise keep their ports from approved devices forever. The registry poll
(`Hub.sync`, every second) calls `poll`; the pass itself runs once a minute.

The time away counts from the hub's start at the earliest: while the hub was
stopped no device could come back, and a node that was online for days before
a restart (its last_seen is when the hub stopped) must not lose its leases in
the first pass because it is slow to call back.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hub.store.registry import Registry

log = Logger()

# How often the (one-query) pass runs; a lease outlives its expiry by at most this.
EXPIRY_INTERVAL = 60.0


@define(eq=False)
class PendingLeaseExpiry:
    """Releases the leases of pending nodes that stayed away `after` seconds."""

    registry: Registry
    clock: IReactorTime
    after: float = 86400.0
    every: float = EXPIRY_INTERVAL
    _due: float = 0.0
    _started: float = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._started = self.clock.seconds()

    def poll(self) -> list[tuple[str, str, int]]:
        """Run the pass if it is due; returns the (node, service, port) released."""
        now = self.clock.seconds()
        if now < self._due:
            return []
        self._due = now + self.every
        if now - self.after < self._started:
            return []  # nobody has been away `after` seconds of this hub's life yet
        released = self.registry.expire_pending_leases(now - self.after)
        for node, service, port in released:
            log.info("node {node}: lease {service}={port} released, the pending node has "
                     "not been back for {after:g} s", node=node, service=service, port=port,
                     after=self.after)
        return released
