"""An operator's grants as read in the registry thread, once per operator action.

Every use of the gateway, the jump host and the web console checks the
operator's user row, its grants, the pairs and the node records named. Made on
the reactor, those reads would stall every tunnel for a database round trip;
so each action first reads them together in the registry thread
(`RegistryGrants.snapshot`), then decides on that snapshot (`GrantsSnapshot`,
the `Grants` the rules in `reach` read) with nothing read on the reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import define, field
from twisted.internet import defer

from hub.errors import NotFound
from hub.rules.pairs import Pair
from hub.store.offthread import RegistryCalls
from hub.store.registry import Node, Registry, User

if TYPE_CHECKING:
    from hub.access.needs import Grants

Audit = Callable[[str, str, str, str], None]


@define(eq=False)
class GrantsSnapshot:
    """One operator's user row, the pairs and the nodes an action names, as read
    together; `audit` is queued in the registry thread."""

    operator: User | None
    pair_rows: list[Pair]
    node_rows: dict[str, Node]  # by lower-case name
    write_audit: Audit = field(default=lambda *_: None)

    def user(self, name: str) -> User:
        if self.operator is None or self.operator.name.lower() != name.lower():
            raise NotFound(f"no user named {name!r}")
        return self.operator

    def node(self, name: str) -> Node:
        found = self.node_rows.get(name.lower())
        if found is None:
            raise NotFound(f"no node named {name!r}")
        return found

    def nodes(self) -> list[Node]:
        return sorted(self.node_rows.values(), key=lambda n: n.id)

    def pair(self, name: str) -> Pair | None:
        return next((p for p in self.pair_rows if p.name.lower() == name.lower()), None)

    def pairs(self) -> list[Pair]:
        return list(self.pair_rows)

    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self.write_audit(actor, action, target, detail)


def read_grants(registry: Registry, user: str, names: tuple[str, ...],
                every_node: bool) -> GrantsSnapshot:
    """In the registry thread: `user`'s row, the pairs, and the nodes `names`
    stand for (a pair's members with it), or every node."""
    try:
        operator: User | None = registry.user(user)
    except NotFound:
        operator = None
    pairs = registry.pairs()
    nodes: dict[str, Node] = {}
    if every_node:
        nodes = {n.name.lower(): n for n in registry.nodes()}
    else:
        wanted = list(names)
        for pair in pairs:
            if any(pair.name.lower() == n.lower() for n in names):
                wanted.extend(pair.members)
        for name in wanted:
            try:
                nodes[name.lower()] = registry.node(name)
            except NotFound:
                pass
    return GrantsSnapshot(operator, pairs, nodes)


@define(eq=False)
class RegistryGrants:
    """The gateway's grants (`GrantsSource`): snapshots read and audit rows
    written in the registry thread."""

    calls: RegistryCalls

    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self.calls.write(Registry.audit, actor, action, target, detail)

    def snapshot(self, user: str, names: tuple[str, ...] = (),
                 every_node: bool = False) -> defer.Deferred[Grants]:
        def with_audit(snapshot: GrantsSnapshot) -> Grants:
            snapshot.write_audit = self.audit
            return snapshot

        return self.calls.call(read_grants, user, names, every_node).addCallback(with_audit)
