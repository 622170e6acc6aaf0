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

from attrs import Factory, define, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.store.offthread import InlineCalls, RegistryCalls
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
    # Registry calls off the reactor (hub.store.offthread); the hub's RegistryThread.
    calls: RegistryCalls = field(
        default=Factory(lambda self: InlineCalls(self.registry), takes_self=True))

    def __attrs_post_init__(self) -> None:
        self._started = self.clock.seconds()

    def poll(self) -> defer.Deferred[list[tuple[str, str, int]]]:
        """Run the pass if it is due (in the registry thread); fires with the
        (node, service, port) released."""
        now = self.clock.seconds()
        if now < self._due:
            return defer.succeed([])
        self._due = now + self.every
        if now - self.after < self._started:
            return defer.succeed([])  # nobody has been away `after` s of this hub's life yet

        def released(leases: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
            for node, service, port in leases:
                log.info("node {node}: lease {service}={port} released, the pending node has "
                         "not been back for {after:g} s", node=node, service=service,
                         port=port, after=self.after)
            return leases

        def failed(f: Failure) -> list[tuple[str, str, int]]:
            log.error("releasing the leases of pending nodes failed: {why}",
                      why=f.getErrorMessage())
            return []

        return self.calls.call(Registry.expire_pending_leases, now - self.after).addCallbacks(
            released, failed)
