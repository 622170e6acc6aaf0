"""The pairs part of the registry: master/clone pairs and their own leases.

A pair is a row of `nodes` of kind `pair` (so a node can never take a pair's
name, and the pair's port leases share the leases table and its unique ports)
plus a `pairs` row naming its members. The node queries of the registry leave
pair rows out. Mixed into `hub.store.registry.Registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from hub.errors import NotFound, RegistryError
from hub.rules.pairs import Pair, pair_problem
from hub.store.engine import Database

PAIR = "pair"  # node kind of a pair's own row

_PAIRS = ("SELECT p.name, m.name, c.name, p.public, p.id FROM pairs x"
          " JOIN nodes p ON p.id = x.pair_id JOIN nodes m ON m.id = x.master_id"
          " JOIN nodes c ON c.id = x.clone_id")


class PairRecords:
    """Pair rows; every method is one transaction of the registry."""

    _db: Database
    _now: Callable[[], float]
    _tx: Callable[[], AbstractContextManager[Database]]
    _audit: Callable[..., None]

    def pairs(self) -> list[Pair]:
        return self._pairs(self._db, "ORDER BY p.name COLLATE NOCASE")

    def pair(self, name: str) -> Pair | None:
        found = self._pairs(self._db, "WHERE p.name = ?", (name,))
        return found[0] if found else None

    def pair_of(self, node: str) -> Pair | None:
        """The pair `node` is a member of, if any."""
        found = self._pairs(self._db, "WHERE m.name = ? OR c.name = ?", (node, node))
        return found[0] if found else None

    @staticmethod
    def _pairs(db: Database, where: str, params: tuple[str, ...] = ()) -> list[Pair]:
        rows = db.execute(f"{_PAIRS} {where}", params).fetchall()
        pairs = []
        for name, master, clone, public, pair_id in rows:
            leases = db.execute("SELECT service, port, active FROM leases WHERE node_id = ?"
                                " ORDER BY port", (pair_id,)).fetchall()
            pairs.append(Pair(name, master, clone, bool(public),
                              {service: port for service, port, _ in leases},
                              frozenset(service for service, _, active in leases if active)))
        return pairs

    def add_pair(self, name: str, master: str, clone: str, actor: str) -> Pair:
        with self._tx() as db:
            nodes = {str(n).lower() for (n,) in db.execute(
                "SELECT name FROM nodes WHERE kind != ?", (PAIR,))}
            why = pair_problem(name, master, clone, nodes, self._pairs(db, ""))
            if why is not None:
                raise RegistryError(why)
            (master_id, master), (clone_id, clone) = (
                db.execute("SELECT id, name FROM nodes WHERE name = ?", (m,)).fetchone()
                for m in (master, clone))
            (pair_id,) = db.execute("INSERT INTO nodes (name, kind, state, created)"
                                    " VALUES (?, ?, 'approved', ?) RETURNING id",
                                    (name, PAIR, self._now())).fetchone()
            db.execute("INSERT INTO pairs (pair_id, master_id, clone_id) VALUES (?, ?, ?)",
                       (pair_id, master_id, clone_id))
            self._audit(db, actor, "pair-add", name, f"master {master} clone {clone}")
        pair = self.pair(name)
        assert pair is not None
        return pair

    def del_pair(self, name: str, actor: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM nodes WHERE name = ? AND kind = ?",
                          (name, PAIR)).rowcount == 0:
                raise NotFound(f"no pair named {name!r}")
            self._audit(db, actor, "pair-del", name, "")

    def set_pair_public(self, name: str, public: bool, actor: str) -> Pair:
        with self._tx() as db:
            if db.execute("UPDATE nodes SET public = ? WHERE name = ? AND kind = ?",
                          (int(public), name, PAIR)).rowcount == 0:
                raise NotFound(f"no pair named {name!r}")
            self._audit(db, actor, "access", name, "on" if public else "off")
        pair = self.pair(name)
        assert pair is not None
        return pair

    def pair_member_refusal(self, db: Database, name: str) -> None:
        """A pair's member cannot be removed: the pair is deleted first."""
        row = db.execute(
            "SELECT p.name FROM pairs x JOIN nodes p ON p.id = x.pair_id"
            " JOIN nodes n ON n.id IN (x.master_id, x.clone_id) WHERE n.name = ?",
            (name,)).fetchone()
        if row is not None:
            raise RegistryError(f"node {name} is a member of pair {row[0]}: "
                                f"delete the pair first (callhomehub pair del {row[0]})")
