"""The port leases part of the registry: each node's port per service.

A lease is the node's own port for one of its services (`ssh`, `http`, ...)
for as long as it is on file, whichever hub the node calls: `lease` gives it
back the same port, or the lowest free one (`hub.rules.ports.lease_port`).
Two hubs leasing at once on PostgreSQL: the unique ports refuse the second
insert and the loser leases again. Mixed into `hub.store.registry.Registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from hub.errors import NotFound, PortsExhausted
from hub.rules.ports import lease_port
from hub.store.engine import Database

T = TypeVar("T")


# A lease's forward up (1) or down (0): active, service, node.
LEASE_ACTIVE = ("UPDATE leases SET active = ? WHERE service = ?"
                " AND node_id = (SELECT id FROM nodes WHERE name = ?)")


class LeaseRecords:
    """Leases; every method is one transaction of the registry."""

    _db: Database
    _tx: Callable[..., AbstractContextManager[Database]]
    _audit: Callable[..., None]
    _touch: Callable[..., None]
    _retried: Callable[[Callable[[], Any]], Any]

    def lease(self, node: str, service: str, low: int, high: int,
              avoid: Collection[int] = (), busy: Collection[int] = ()) -> tuple[int, bool]:
        """The node's port for `service`, as `lease_port` decides from the leases
        on file, recorded. Returns (port, is_new). Ports in `busy` are taken only
        when no other is free. Two hubs leasing at once on PostgreSQL: the leases
        table's unique ports refuse the second insert of a port, and the loser
        leases again, seeing the winner's lease."""
        kept = self._kept_port(node, service, low, high, avoid)
        if kept is not None:
            return kept, False
        return self._retried(lambda: self._lease(node, service, low, high, avoid, busy))

    def _kept_port(self, node: str, service: str, low: int, high: int,
                   avoid: Collection[int]) -> int | None:
        """The node's lease for `service` if `lease_port` keeps it, read without a
        write transaction: a device calling back (every device in a reconnect
        storm) changes nothing, and a transaction made every other hub and worker
        read its node again."""
        row = self._db.execute(
            "SELECT l.port FROM leases l JOIN nodes n ON n.id = l.node_id"
            " WHERE n.name = ? AND l.service = ?", (node, service)).fetchone()
        if row is None:
            return None
        return lease_port(low, high, (), avoid, int(row[0]))

    def _lease(self, node: str, service: str, low: int, high: int,
               avoid: Collection[int], busy: Collection[int]) -> tuple[int, bool]:
        with self._tx() as db:
            row = db.execute("SELECT id FROM nodes WHERE name = ?", (node,)).fetchone()
            if row is None:
                raise NotFound(f"no node named {node!r}")
            node_id = row[0]
            row = db.execute("SELECT port FROM leases WHERE node_id = ? AND service = ?",
                             (node_id, service)).fetchone()
            previous = None if row is None else int(row[0])
            port = lease_port(low, high, self._free_ports(db, low, high), avoid, previous, busy)
            if port is None and busy:  # only busy ones left: they may have been let go
                port = lease_port(low, high, self._free_ports(db, low, high), avoid, previous)
            if port is None:
                raise PortsExhausted(f"no free port left in {low}-{high}")
            if port == previous:
                return port, False
            self._touch(node)
            db.execute("DELETE FROM leases WHERE node_id = ? AND service = ?",
                       (node_id, service))
            db.execute("INSERT INTO leases (node_id, service, port) VALUES (?, ?, ?)",
                       (node_id, service, port))
            self._audit(db, "hub", "lease", node, f"{service}={port}")
            return port, True

    @staticmethod
    def _free_ports(db: Database, low: int, high: int) -> Iterator[int]:
        """The unleased ports of [low, high], lowest first.

        The port index finds where each free stretch starts (`low`, or just above
        a lease) and ends (just below the next lease), so a new lease never loads
        every leased port: a reconnect storm of thousands of new leases stays linear.
        Nothing is queried unless the caller reads past the sticky lease.
        """
        stretches = db.execute(
            "SELECT start, (SELECT MIN(port) FROM leases WHERE port > start) - 1 FROM ("
            " SELECT ? AS start WHERE NOT EXISTS (SELECT 1 FROM leases WHERE port = ?)"
            " UNION ALL"
            " SELECT l.port + 1 FROM leases l WHERE l.port BETWEEN ? AND ?"
            " AND NOT EXISTS (SELECT 1 FROM leases m WHERE m.port = l.port + 1)) AS free"
            " ORDER BY start", (low, low, low, high - 1)).fetchall()
        for start, last in stretches:
            yield from range(start, high + 1 if last is None else min(last, high) + 1)

    def set_lease_active(self, node: str, service: str, active: bool) -> None:
        with self._tx() as db:
            self._touch(node)
            db.execute(LEASE_ACTIVE, (int(active), service, node))

    def expire_pending_leases(self, before: float) -> list[tuple[str, str, int]]:
        """Release the leases of pending nodes offline and last seen before
        `before` (a node that connected but never came back: its last_seen is
        when it went away). Returns the (node, service, port) released."""
        with self._tx() as db:
            expired = db.execute(
                "SELECT n.name, l.service, l.port FROM leases l JOIN nodes n ON n.id = l.node_id"
                " WHERE n.state = 'pending' AND n.online = 0 AND l.active = 0"
                " AND COALESCE(n.last_seen, n.created) < ? ORDER BY l.port", (before,)).fetchall()
            db.executemany("DELETE FROM leases WHERE port = ?", [(p,) for _, _, p in expired])
            self._touch(*(str(name) for name, _, _ in expired))
            for name, service, port in expired:
                self._audit(db, "hub", "lease-expired", name, f"{service}={port}")
        return [(str(n), str(s), int(p)) for n, s, p in expired]
