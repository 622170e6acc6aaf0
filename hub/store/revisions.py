"""Which nodes changed since a hub last read them, and the hub's copy of the list.

Every write the hubs act on bumps `generation` (hub.store.registry) and stamps
the node rows it touched, the node's own or its leases, with the new value
(`nodes.revision`). A hub then reads only the rows stamped after its last read
(`node_changes`) and keeps the rest from before (`NodeMirror`): with thousands
of nodes, a reconnect storm makes a change every poll on every hub, and reading
the whole list each time (170 ms for 10,000 nodes) made two workers slower than
one (docs/performance.md, section 8).

A removed node leaves no row to stamp; each removal counts in `settings`
('removals', in the removal's transaction), and a mirror that sees the count
move reads the whole list again (removals are rare, an admin's act).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import define, field, frozen

from hub.store.engine import Database
from hub.store.rows import NODE_COLUMNS, Node, select

# A pair's own row (kind `pair`, hub.store.pairs) is not a node.
NODES = select(NODE_COLUMNS, "(SELECT * FROM nodes WHERE kind != 'pair') AS node_rows")


# Counters in `settings`, each raised in the transaction of what it counts.
GENERATION = "generation"  # writes the hubs act on (hub.store.registry)
REMOVALS = "removals"      # nodes removed
_COUNT_UP = ("INSERT INTO settings (key, value) VALUES (?, '1') ON CONFLICT (key)"
             " DO UPDATE SET value = CAST(CAST(settings.value AS INTEGER) + 1 AS TEXT)")


def count_up(db: Database, key: str) -> None:
    db.execute(_COUNT_UP, (key,))


def counter(db: Database, key: str) -> int:
    row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return 0 if row is None else int(row[0])


def read_nodes(db: Database, where: str = "", params: Sequence[Any] = ()) -> list[Node]:
    """The nodes `where` selects (all by default, in id order), with their leases,
    in two queries however many there are."""
    # Changes are read by the revision index, unsorted: sorting by id would scan all.
    order = "" if where else "ORDER BY id"
    rows = db.execute(f"{NODES} {where} {order}", tuple(params)).fetchall()
    if not rows:
        return []
    leases = "SELECT node_id, service, port, active FROM leases"
    if where:
        leases += f" WHERE node_id IN (SELECT id FROM nodes {where})"  # noqa: S608 (constant)
    forwards: dict[int, dict[str, int]] = {}
    live: dict[int, set[str]] = {}
    for node_id, service, port, active in db.execute(f"{leases} ORDER BY port", tuple(params)):
        forwards.setdefault(node_id, {})[service] = port
        if active:
            live.setdefault(node_id, set()).add(service)
    ids = NODE_COLUMNS.index("id")
    return [Node.from_row(row, forwards.get(row[ids], {}), frozenset(live.get(row[ids], ())))
            for row in rows]


@frozen
class NodeChanges:
    generation: int      # read before the rows: a later change is read again next time
    removals: int        # nodes removed since the registry was made, read before the rows
    nodes: list[Node]    # changed since the revision asked for (all when none was)


class RevisionRecords:
    """Node stamps; mixed into `hub.store.registry.Registry`."""

    _db: Database
    # The node names the write transaction under way changed (`_tx` empties it).
    _touched: set[str]

    def _touch(self, *names: str) -> None:
        """The transaction under way changes these nodes (or their leases)."""
        self._touched.update(names)

    def _touch_where(self, db: Database, where: str, params: Sequence[Any]) -> None:
        """... the nodes `where` selects (read before the statements that change them)."""
        self._touched.update(str(n) for (n,) in db.execute(
            f"SELECT name FROM nodes WHERE {where}", tuple(params)))  # noqa: S608 (constant)

    def _count_removal(self, db: Database) -> None:
        """The transaction under way removes a node (a mirror must read all again)."""
        count_up(db, REMOVALS)

    def _stamp(self, db: Database, generation: int) -> None:
        """Stamp the touched nodes with the generation their transaction made."""
        if self._touched:
            db.executemany("UPDATE nodes SET revision = ? WHERE name = ?",
                           [(generation, name) for name in self._touched])
            self._touched.clear()

    def node_changes(self, since: int | None) -> NodeChanges:
        """The nodes changed after generation `since` (all of them if None)."""
        generation, removals = counter(self._db, GENERATION), counter(self._db, REMOVALS)
        if since is None:
            return NodeChanges(generation, removals, read_nodes(self._db))
        return NodeChanges(generation, removals,
                           read_nodes(self._db, "WHERE revision > ?", (since,)))


@frozen
class NodeUpdate:
    """The node list as a hub last read it, and what changed for one reader.

    `whole` says nodes may have gone (the first read, a removal, a reader too
    far behind): compare everything held against `nodes`. Otherwise only the
    nodes in `changed` differ from what the reader had, so a change to one
    node costs the reader one node, not a pass over 10,000 (docs/performance.md,
    section 8)."""

    nodes: dict[str, Node]   # every node by lower-cased name: the reader's own copy
    changed: list[Node]      # changed since the reader's last update (all when whole)
    whole: bool

    @classmethod
    def of(cls, nodes: Iterable[Node]) -> NodeUpdate:
        """A whole list read at once (no mirror)."""
        by_name = {n.name.lower(): n for n in nodes}
        return cls(by_name, list(by_name.values()), True)


@define(eq=False)
class MirrorCursor:
    """Where one reader of a `NodeMirror` is: the mirror's read it last had."""

    seen: int = -1


# How many reads' changes a mirror keeps for readers that skipped some; one
# further behind gets the whole list.
KEPT_READS = 64


@define(eq=False)
class NodeMirror:
    """The node list as the hub last read it, brought up to date from the rows
    changed since. Used in the registry thread only (one reader at a time)."""

    _nodes: dict[str, Node] = field(factory=dict)
    _since: int | None = None
    _removals: int = 0
    # Reads of the whole list (the first, and after a removal), and of changes only.
    full_reads: int = 0
    change_reads: int = 0
    # This mirror's reads, counted, and the nodes each of the last ones changed:
    # several readers share the mirror (`Hub.apply`, the fleet view), each with
    # its cursor, so a change one reader's read brought in reaches the others.
    _reads: int = 0
    _whole_at: int = 0
    _recent: deque[tuple[int, list[Node]]] = field(factory=lambda: deque(maxlen=KEPT_READS))

    def nodes(self, registry: RevisionRecords) -> list[Node]:
        self._read(registry)
        return list(self._nodes.values())

    def update(self, registry: RevisionRecords, cursor: MirrorCursor) -> NodeUpdate:
        """The nodes now, and those changed since `cursor`'s last update (which moves)."""
        self._read(registry)
        nodes, seen = dict(self._nodes), cursor.seen
        cursor.seen = self._reads
        # Complete only if every read after `seen` is still kept, and none was whole.
        oldest = self._recent[0][0] if self._recent else self._reads + 1
        if seen < self._whole_at or oldest > seen + 1:
            return NodeUpdate(nodes, list(nodes.values()), True)
        changed = {n.name.lower(): n for read, batch in self._recent if read > seen
                   for n in batch}
        return NodeUpdate(nodes, list(changed.values()), False)

    def _read(self, registry: RevisionRecords) -> None:
        changes = registry.node_changes(self._since)
        self._reads += 1
        if self._since is not None and changes.removals == self._removals:
            self.change_reads += 1
            self._update(changes.nodes)
            self._recent.append((self._reads, changes.nodes))
        else:
            if self._since is not None:  # a node was removed: read them all
                changes = registry.node_changes(None)
            self._replace(changes.nodes)
            self._whole_at = self._reads
            self._recent.clear()
        self._since, self._removals = changes.generation, changes.removals

    def _replace(self, nodes: Iterable[Node]) -> None:
        self.full_reads += 1
        self._nodes = {}
        self._update(nodes)

    def _update(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            self._nodes[node.name.lower()] = node
