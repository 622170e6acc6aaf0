"""This hub's row in the registry, its heartbeat, and the reclaim of dead hubs.

Every `interval` seconds the hub writes its heartbeat and looks at the other
hubs: one whose heartbeat is older than `DEAD_AFTER` intervals is dead, and
its claims are cleared (`Registry.reclaim_hub`: its nodes offline, their
leases inactive, nothing deleted). Every live hub does this; the first to see
a dead hub clears it, the others find nothing left.

A hub judges others only once its own heartbeats have gone through for
`DEAD_AFTER` intervals in a row (after its start, or after the registry failed
it): when the registry itself was away (PostgreSQL down for longer than a
death), every hub's last heartbeat looks old, and the first hub back would
otherwise declare all the others dead while they are only a beat behind.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.rules.cluster import DEAD_AFTER, HEARTBEAT, has_stopped, is_live
from hub.store.offthread import RegistryCalls
from hub.store.registry import Registry

log = Logger()

# A hub found dead and the nodes it held, cleared: (hub, its last heartbeat, nodes).
Reclaimed = list[tuple[str, float, list[str]]]


def beat_in_thread(registry: Registry, hub_id: str, address: str, peer_key: str,
                   now: float, interval: float, judge: bool = True) -> Reclaimed:
    """One heartbeat in the registry thread: write it (the row again if it was
    lost) and, if `judge`, clear the claims of dead hubs."""
    if not registry.hub_heartbeat(hub_id):
        registry.hub_started(hub_id, address, peer_key)
    return reclaim_in_thread(registry, hub_id, now, interval) if judge else []


def reclaim_in_thread(registry: Registry, hub_id: str, now: float,
                      interval: float) -> Reclaimed:
    reclaimed: Reclaimed = []
    for row in registry.hubs():
        if row.id == hub_id or is_live(row.heartbeat, now, interval):
            continue
        nodes = registry.reclaim_hub(row.id, f"hub:{hub_id}")
        if nodes:
            reclaimed.append((row.id, row.heartbeat, nodes))
    return reclaimed


@define(eq=False)
class HubHeartbeat:
    """Writes the heartbeat and reclaims dead hubs in the registry thread."""

    calls: RegistryCalls
    clock: IReactorTime
    hub_id: str
    peer_key: str  # this hub's peer public key, an OpenSSH line
    interval: float = HEARTBEAT
    address: str = ""
    # Told after each heartbeat (the relayed ports follow hubs that die), or None.
    on_beat: Callable[[], object] | None = None
    _loop: task.LoopingCall | None = field(default=None)
    # Since when this hub's heartbeats have all gone through (None: the last failed,
    # or none has yet): it judges other hubs DEAD_AFTER intervals after that.
    _steady_since: float | None = None

    def start(self, address: str) -> None:
        """Publish this hub at `address` (host:port peers dial) and start beating."""
        self.address = address
        self.calls.write(Registry.hub_started, self.hub_id, address, self.peer_key)
        log.info("hub {hub} joined the fleet, peers dial {address}", hub=self.hub_id,
                 address=address)
        self._loop = task.LoopingCall(self.beat)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            # Queued: the registry thread stops last, after every call queued before.
            self.calls.write(Registry.hub_stopped, self.hub_id)

    def beat(self) -> defer.Deferred[list[str]]:
        """Write the heartbeat, reclaim dead hubs; fires with the nodes reclaimed
        (never fails: a failed beat is logged and the loop goes on)."""
        now = self.clock.seconds()
        judge = (self._steady_since is not None
                 and now - self._steady_since >= DEAD_AFTER * self.interval)
        done = self.calls.call(beat_in_thread, self.hub_id, self.address, self.peer_key,
                               now, self.interval, judge)

        def through(reclaimed: Reclaimed) -> Reclaimed:
            if self._steady_since is None:
                self._steady_since = now
            return reclaimed

        return done.addCallback(through).addCallbacks(self._reclaimed, self._failed)

    def reclaim(self) -> defer.Deferred[list[str]]:
        """Look for dead hubs now, steady or not (what the loop does once steady)."""
        done = self.calls.call(reclaim_in_thread, self.hub_id, self.clock.seconds(),
                               self.interval)
        return done.addCallbacks(self._reclaimed, self._failed)

    def _reclaimed(self, reclaimed: Reclaimed) -> list[str]:
        now = self.clock.seconds()
        for dead, heartbeat, nodes in reclaimed:
            if has_stopped(heartbeat):
                # It said it stops (`hub_stopped`): the nodes it could not mark
                # offline as its registry closed, not a failure.
                log.info("hub {dead} stopped: {n} node(s) it held are offline now, their "
                         "ports kept: {nodes}", dead=dead, n=len(nodes),
                         nodes=", ".join(nodes))
                continue
            log.warn("hub {dead} is dead (last heartbeat {age:.0f} s ago): {n} node(s) "
                     "it held are offline now, their ports kept: {nodes}", dead=dead,
                     age=now - heartbeat, n=len(nodes), nodes=", ".join(nodes))
        if self.on_beat is not None:
            self.on_beat()
        return [node for _, _, nodes in reclaimed for node in nodes]

    def _failed(self, f: Failure) -> list[str]:
        self._steady_since = None
        log.error("hub {hub}: heartbeat failed: {why}", hub=self.hub_id,
                  why=f.getErrorMessage())
        return []
