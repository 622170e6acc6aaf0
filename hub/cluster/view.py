"""The fleet as this hub last read it: the hubs and which hub holds each node.

Routing (`LiveSessions.get` of a node held elsewhere) and the relayed ports
answer from this view, never from the registry on the reactor: a registry
50 ms away would otherwise stall every tunnel for each lookup. The view is read
in the registry thread on each change the hub applies and after each
heartbeat, from the hub's `NodeMirror` (only the nodes changed since the last
read; the whole list is 170 ms with 10,000 nodes); reads never stack (a change
while one is under way asks for one more read after it).
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.errors import RegistryStopped
from hub.store.hubs import HubRow
from hub.store.offthread import RegistryCalls
from hub.store.registry import Node, Registry
from hub.store.revisions import MirrorCursor, NodeMirror, NodeUpdate

log = Logger()

# The hubs and the nodes, read together in the registry thread.
Fleet = tuple[list[HubRow], NodeUpdate]


@define(eq=False)
class FleetView:
    """The hubs and nodes on file as last read; `refresh` reads them again."""

    calls: RegistryCalls
    # The nodes as the hub last read them (only those changed since are read).
    mirror: NodeMirror = field(factory=NodeMirror)
    # Where this view's own reads are in the mirror's (`Hub.apply` reads it too).
    cursor: MirrorCursor = field(factory=MirrorCursor)
    # Told after each read is applied (the relayed ports follow it).
    on_refresh: list[Callable[[], object]] = field(factory=list)
    _hubs: dict[str, HubRow] = field(factory=dict)
    _nodes: dict[str, Node] = field(factory=dict)
    _reading: defer.Deferred[None] | None = None
    _again: bool = False

    def refresh(self) -> defer.Deferred[None]:
        """Read the fleet in the registry thread and apply it; fires once applied
        (a refresh asked for while one runs is folded into one more read)."""
        if self._reading is not None:
            self._again = True
            return self._reading
        done: defer.Deferred[None] = defer.Deferred()
        self._reading = done
        self._read(done)
        return done

    def _read(self, done: defer.Deferred[None]) -> None:
        self._again = False

        def failed(f: Failure) -> None:
            if f.check(RegistryStopped):  # the hub is stopping: nothing to route
                return
            log.error("reading the fleet's hubs and nodes failed: {why}; routing keeps "
                      "the last view", why=f.getErrorMessage())

        def finished(_: object) -> None:
            if self._again:
                self._read(done)
                return
            self._reading = None
            done.callback(None)

        self.calls.call(self.read).addCallback(self.apply).addErrback(failed).addBoth(
            finished)

    def read(self, registry: Registry) -> Fleet:
        """The hubs and nodes on file (run in the registry thread)."""
        return registry.hubs(), self.mirror.update(registry, self.cursor)

    def apply(self, fleet: Fleet) -> None:
        hubs, nodes = fleet
        self._hubs = {h.id: h for h in hubs}
        self._nodes = nodes.nodes  # the mirror's copy, already by lower-cased name
        for listener in self.on_refresh:
            listener()

    def hubs(self) -> list[HubRow]:
        return list(self._hubs.values())

    def hub(self, hub_id: str) -> HubRow | None:
        return self._hubs.get(hub_id)

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def node(self, name: str) -> Node | None:
        return self._nodes.get(name.lower())

    def holder(self, name: str) -> str | None:
        """The hub holding `name` online, as last read (`Registry.hub_of`)."""
        node = self._nodes.get(name.lower())
        return None if node is None or not node.online else node.hub
