"""The hubs part of the registry: which hubs serve the fleet, and who holds each node.

Each running hub with a peer listener keeps a row (`hubs`): its peer address,
its peer public key (an OpenSSH line) and a heartbeat. A node's `hub` column
names the hub holding its tunnel. A hub whose heartbeat is too old is dead
(`hub.rules.cluster`); `reclaim_hub` clears its claims without deleting
anything: its nodes go offline and their leases inactive, so a device that
calls another hub gets its old ports. Mixed into `hub.store.registry.Registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from attrs import frozen

from hub.rules.cluster import STOPPED
from hub.store.engine import Database
from hub.store.rows import select

HUB_COLUMNS = ("id", "peer_address", "peer_key", "started", "heartbeat")


@frozen
class HubRow:
    id: str
    peer_address: str  # host:port other hubs dial
    peer_key: str      # the hub's peer public key, an OpenSSH public key line
    started: float
    heartbeat: float


class HubRecords:
    """Hub rows and node claims; every method is one transaction of the registry."""

    _db: Database
    _now: Callable[[], float]
    _tx: Callable[..., AbstractContextManager[Database]]
    _audit: Callable[..., None]
    _touch: Callable[..., None]

    def hub_started(self, hub_id: str, peer_address: str, peer_key: str) -> None:
        """Write this hub's row (a restart keeps the id and replaces the rest)."""
        now = self._now()
        with self._tx() as db:
            db.execute(
                "INSERT INTO hubs (id, peer_address, peer_key, started, heartbeat)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " peer_address = excluded.peer_address, peer_key = excluded.peer_key,"
                " started = excluded.started, heartbeat = excluded.heartbeat",
                (hub_id, peer_address, peer_key, now, now))

    def hub_heartbeat(self, hub_id: str) -> bool:
        """This hub is alive now; False if its row is gone (written again by the caller)."""
        # No notice: every hub beats every 5 s, and a beat changes nothing hubs enforce.
        with self._tx(notify=False) as db:
            return db.execute("UPDATE hubs SET heartbeat = ? WHERE id = ?",
                              (self._now(), hub_id)).rowcount > 0

    def hub_stopped(self, hub_id: str) -> None:
        """This hub stops: its heartbeat is set to STOPPED (0), so every peer sees it
        dead now."""
        with self._tx() as db:
            db.execute("UPDATE hubs SET heartbeat = ? WHERE id = ?", (STOPPED, hub_id))

    def hubs(self) -> list[HubRow]:
        rows = self._db.execute(f"{select(HUB_COLUMNS, 'hubs')} ORDER BY id").fetchall()
        return [HubRow(str(i), str(a), str(k), float(s), float(h)) for i, a, k, s, h in rows]

    def hub_of(self, node: str) -> str | None:
        """The hub holding `node`'s tunnel (or its connection) now, or None."""
        row = self._db.execute("SELECT hub FROM nodes WHERE name = ? AND online = 1",
                               (node,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def reclaim_hub(self, hub_id: str, actor: str) -> list[str]:
        """Clear the claims of dead hub `hub_id`: its nodes offline, their leases
        inactive (kept: the ports stay the nodes' own). Returns those nodes."""
        with self._tx() as db:
            names = [str(n) for (n,) in db.execute(
                "SELECT name FROM nodes WHERE hub = ? ORDER BY name", (hub_id,))]
            if not names:
                return []
            self._touch(*names)
            db.execute("UPDATE leases SET active = 0"
                       " WHERE node_id IN (SELECT id FROM nodes WHERE hub = ?)", (hub_id,))
            db.execute("UPDATE nodes SET online = 0, online_since = NULL, hub = NULL"
                       " WHERE hub = ?", (hub_id,))
            self._audit(db, actor, "hub-reclaim", hub_id, f"{len(names)} node(s) offline")
        return names
