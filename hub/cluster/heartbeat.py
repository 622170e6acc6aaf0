"""This hub's row in the registry, its heartbeat, and the reclaim of dead hubs.

Every `interval` seconds the hub writes its heartbeat and looks at the other
hubs: one whose heartbeat is older than `DEAD_AFTER` intervals is dead, and
its claims are cleared (`Registry.reclaim_hub`: its nodes offline, their
leases inactive, nothing deleted). Every live hub does this; the first to see
a dead hub clears it, the others find nothing left.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hub.errors import RegistryError
from hub.rules.cluster import HEARTBEAT, is_live
from hub.store.registry import Registry

log = Logger()


@define(eq=False)
class HubHeartbeat:
    registry: Registry
    clock: IReactorTime
    hub_id: str
    peer_key: str  # this hub's peer public key, an OpenSSH line
    interval: float = HEARTBEAT
    address: str = ""
    # Told after each heartbeat (the relayed ports follow hubs that die), or None.
    on_beat: Callable[[], None] | None = None
    _loop: task.LoopingCall | None = field(default=None)

    def start(self, address: str) -> None:
        """Publish this hub at `address` (host:port peers dial) and start beating."""
        self.address = address
        self.registry.hub_started(self.hub_id, address, self.peer_key)
        log.info("hub {hub} joined the fleet, peers dial {address}", hub=self.hub_id,
                 address=address)
        self._loop = task.LoopingCall(self.beat)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            try:
                self.registry.hub_stopped(self.hub_id)
            except RegistryError as e:
                log.error("hub {hub}: could not record its stop: {why}", hub=self.hub_id,
                          why=str(e))

    def beat(self) -> list[str]:
        """Write the heartbeat, reclaim dead hubs; returns the nodes reclaimed."""
        try:
            if not self.registry.hub_heartbeat(self.hub_id):
                self.registry.hub_started(self.hub_id, self.address, self.peer_key)
            reclaimed = self.reclaim()
            if self.on_beat is not None:
                self.on_beat()
            return reclaimed
        except RegistryError as e:
            log.error("hub {hub}: heartbeat failed: {why}", hub=self.hub_id, why=str(e))
            return []

    def reclaim(self) -> list[str]:
        now = self.clock.seconds()
        reclaimed: list[str] = []
        for row in self.registry.hubs():
            if row.id == self.hub_id or is_live(row.heartbeat, now, self.interval):
                continue
            nodes = self.registry.reclaim_hub(row.id, f"hub:{self.hub_id}")
            if nodes:
                log.warn("hub {dead} is dead (last heartbeat {age:.0f} s ago): {n} node(s) "
                         "it held are offline now, their ports kept: {nodes}", dead=row.id,
                         age=now - row.heartbeat, n=len(nodes), nodes=", ".join(nodes))
            reclaimed.extend(nodes)
        return reclaimed
