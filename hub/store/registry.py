"""The registry: nodes, port leases, operators, settings and the audit log.

By default one SQLite file (`DATA/hub.sqlite3`) shared by the running hub and
the admin CLI, in WAL mode; or a PostgreSQL database shared by several hubs
(`--registry postgresql://...`, see `hub.store.engine`). A versioned schema with
forward-only migrations, and every change in one transaction, so a process killed
at any instant leaves a consistent registry. The hub notices other processes'
changes through `PRAGMA data_version` or PostgreSQL's LISTEN/NOTIFY (`changed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from attrs import define

from hub.errors import BatchBroken, NameTaken, NotFound, RegistryBusy, RegistryError
from hub.store.engine import Database, connect
from hub.store.engine import keep_private as keep_private
from hub.store.hubs import HubRecords
from hub.store.latency import Latency
from hub.store.leases import LEASE_ACTIVE, LeaseRecords
from hub.store.operators import KEEP, Keep, OperatorRecords
from hub.store.pairs import PAIR, PairRecords
from hub.store.revisions import (
    GENERATION,
    NODES,
    RevisionRecords,
    count_up,
    counter,
    read_nodes,
)
from hub.store.rows import (
    AUDIT_COLUMNS,
    NETCONF,
    NODE_COLUMNS,
    STATES,
    AuditEntry,
    Node,
    User,
    select,
)
from hub.store.schema import MIGRATIONS, migrate, transaction
from hub.store.websessions import WebSessionRecords

T = TypeVar("T")
# Attempts of a write that met another hub's write of the same rows (PostgreSQL).
ATTEMPTS = 8

_STATE_ACTIONS = {"pending": "pending", "approved": "approve", "revoked": "revoke"}

# Marking nodes online and offline; with a hub id (hub.store.hubs) a hub
# touches only the nodes it holds, or that no hub holds.
_ONLINE = ("UPDATE nodes SET online = 1, online_since = ?, last_seen = ?, peer = ?, hub = ?"
           " WHERE name = ?")
_UNLESS_HELD = " AND (online = 0 OR hub IS NULL OR hub = ?)"
_OFFLINE = ("UPDATE nodes SET online = 0, online_since = NULL, last_seen = ?, hub = NULL"
            " WHERE name = ?")
_LEASES_OFF = "UPDATE leases SET active = 0 WHERE node_id = (SELECT id FROM nodes WHERE name = ?"
_MINE = " AND (hub IS NULL OR hub = ?)"
# GENERATION (hub.store.revisions): a counter every write the hubs act on bumps in its
# own transaction (nodes, leases, users, grants, pairs, certificates, settings);
# `changed` compares it.

# The savepoint of each write in a `Registry.batch` (they never nest).
_SAVEPOINT = "batch_write"


@define
class _Batch:
    """A `Registry.batch` under way: whether one of its writes moves `generation`."""

    notify: bool = False


__all__ = ["KEEP", "MIGRATIONS", "NETCONF", "STATES", "AuditEntry", "Keep", "Node", "Registry",
           "User"]


class Registry(OperatorRecords, PairRecords, HubRecords, LeaseRecords, WebSessionRecords,
               RevisionRecords):
    """Synchronous access to the registry file; each method is one transaction."""

    # This hub's `[cluster] id` when it peers with others (hub.store.hubs): the
    # nodes it marks online are claimed for it, and it marks offline only its
    # own. None (a single hub, the CLI): every node is this process's.
    hub_id: str | None = None

    def __init__(self, path: str, now: Callable[[], float], *,
                 migrations: Sequence[str] = MIGRATIONS,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        """`path`: the SQLite file, or a `postgresql://` URL."""
        self._now = now
        # How long each write transaction takes (read by the metrics).
        self.latency = Latency()
        self._timer = timer
        self._counts: tuple[tuple[int, int], dict[str, int]] | None = None
        self._touched = set()
        self._batch: _Batch | None = None
        self._db: Database = connect(path, timer)
        try:
            migrate(self._db, migrations)
        except RegistryError:
            self._db.close()
            raise
        self._seen = self._db.generation()[1]
        self._reopened = 0
        self._generation = counter(self._db, GENERATION)

    @property
    def name(self) -> str:
        """The registry as messages name it (a URL without its password)."""
        return self._db.name

    def close(self) -> None:
        self._db.close()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read for modules that keep their own tables here (monitoring)."""
        return self._db.execute(sql, params).fetchall()

    def transaction(self) -> AbstractContextManager[Database]:
        """One write transaction, for modules that keep their own tables here
        (monitoring results, session records: nothing the hubs enforce)."""
        return self._tx(notify=False)

    @contextmanager
    def _tx(self, notify: bool = True) -> Iterator[Database]:
        """One write transaction; `notify` False for writes no hub has to act on
        (heartbeats, last seen, audit-only entries), which leave `generation` alone.
        Inside `batch`, a savepoint of the batch's transaction instead."""
        if self._batch is not None:
            with self._savepoint() as db:
                yield db
            self._batch.notify = self._batch.notify or notify
            return
        start = self._timer()
        self._touched.clear()
        try:
            with transaction(self._db) as db:
                yield db
                if notify:
                    self._bump(db)
        finally:
            self.latency.observe(self._timer() - start)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The writes made inside run in one transaction, each in a savepoint of its
        own: a write that fails is undone alone and the others stay, as if each had
        been its own transaction, but the batch commits (and takes SQLite's write
        lock) once. `generation` moves once, stamping every node the batch touched;
        the latency histogram counts the batch as one transaction.

        Raises `BatchBroken` (nothing committed) when a write's savepoint could not
        be rolled back, the transaction having gone with it (SQLite undoes a whole
        transaction on some I/O errors); an error at the commit (nothing committed
        on SQLite, perhaps committed on a PostgreSQL connection lost meanwhile) is
        raised as it is."""
        if self._batch is not None:
            raise RegistryError("registry batches do not nest")
        start = self._timer()
        self._touched.clear()
        self._batch = _Batch()
        try:
            with transaction(self._db) as db:
                yield
                if self._batch.notify:
                    self._bump(db)
        finally:
            self._batch = None
            self.latency.observe(self._timer() - start)

    @contextmanager
    def _savepoint(self) -> Iterator[Database]:
        """One write of a batch: undone alone if it fails."""
        db = self._db
        db.execute(f"SAVEPOINT {_SAVEPOINT}")
        try:
            yield db
        except BaseException as e:
            try:
                db.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
                db.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            except Exception as lost:
                raise BatchBroken(f"a write of the batch failed ({e}) and could not be "
                                  f"undone alone: {lost}") from e
            raise
        db.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")

    @staticmethod
    def _retried(write: Callable[[], T]) -> T:
        """`write` (one transaction) again while another hub's concurrent write of
        the same rows made it fail (a port or a key taken meanwhile): the next
        attempt reads what that hub committed."""
        for _ in range(ATTEMPTS - 1):
            try:
                return write()
            except RegistryBusy:
                continue
        return write()

    def _bump(self, db: Database) -> None:
        count_up(db, GENERATION)
        new = counter(db, GENERATION)
        self._stamp(db, new)
        # Our own change is not news to us, unless another's came before it unseen.
        if new - 1 == self._generation:
            self._generation = new

    def changed(self) -> bool:
        """True once after another process (the CLI, another hub) committed a
        change the hubs act on: one that bumped `generation`. Another hub's
        heartbeat is not one, so it costs a hub no read of the node list."""
        others = self._db.generation()[1]  # free when no other process wrote at all
        if others == self._seen:
            return False
        self._seen = others
        generation = counter(self._db, GENERATION)
        if generation == self._generation and self._db.reopened == self._reopened:
            return False
        self._reopened = self._db.reopened
        self._generation = generation
        return True

    # -- settings ---------------------------------------------------------

    def setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str, actor: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?)"
                       " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
            self._audit(db, actor, "setting", key, "")

    # -- nodes ------------------------------------------------------------

    def nodes(self) -> list[Node]:
        return read_nodes(self._db)

    def node_counts(self) -> dict[str, int]:
        """How many nodes are in each state. Counted again only after a change
        (this connection's or another process's): a metrics scrape of an
        unchanged registry reads no rows."""
        key = self._db.generation()
        if self._counts is None or self._counts[0] != key:
            counts = dict.fromkeys(STATES, 0)
            counts.update(self._db.execute(
                "SELECT state, COUNT(*) FROM nodes WHERE kind != ? GROUP BY state",
                (PAIR,)).fetchall())
            self._counts = (key, counts)
        return dict(self._counts[1])

    def node(self, name: str) -> Node:
        row = self._db.execute(f"{NODES} WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no node named {name!r}")
        return self._node(row)

    def node_by_key(self, key_blob: bytes) -> Node | None:
        row = self._db.execute(f"{NODES} WHERE key_blob = ?", (key_blob,)).fetchone()
        return None if row is None else self._node(row)

    def node_by_host_key(self, host_key: bytes) -> Node | None:
        """The NETCONF node whose recorded device host key this is."""
        row = self._db.execute(f"{NODES} WHERE kind = ? AND host_key = ?",
                               (NETCONF, host_key)).fetchone()
        return None if row is None else self._node(row)

    def _node(self, row: Sequence[Any]) -> Node:
        """The node of one `NODES` row, with its leases."""
        node_id = row[NODE_COLUMNS.index("id")]
        leases = self._db.execute(
            "SELECT service, port, active FROM leases WHERE node_id = ? ORDER BY port",
            (node_id,)).fetchall()
        return Node.from_row(row, {service: port for service, port, _ in leases},
                             frozenset(service for service, _, active in leases if active))

    def register(self, name: str, key_blob: bytes, fingerprint: str,
                 actor: str) -> tuple[Node, bool]:
        """Record a device key as node `name` (pending). Returns (node, created).

        The same key again is not an error: the existing node is returned.
        """
        return self._retried(lambda: self._register(name, key_blob, fingerprint, actor))

    def _register(self, name: str, key_blob: bytes, fingerprint: str,
                  actor: str) -> tuple[Node, bool]:
        with self._tx() as db:
            row = db.execute("SELECT name FROM nodes WHERE key_blob = ?", (key_blob,)).fetchone()
            if row is not None:
                existing = row[0]
            else:
                self._name_free(db, name)
                db.execute(
                    "INSERT INTO nodes (name, key_blob, fingerprint, state, created)"
                    " VALUES (?, ?, ?, 'pending', ?)",
                    (name, key_blob, fingerprint, self._now()),
                )
                self._touch(name)
                self._audit(db, actor, "register", name, fingerprint)
                existing = None
        if existing is not None:
            return self.node(existing), False
        return self.node(name), True

    def register_netconf(self, name: str, host_key: bytes, fingerprint: str,
                         actor: str) -> tuple[Node, bool]:
        """Record a NETCONF device by its host key as node `name` (pending).

        Returns (node, created); the same host key again returns its node.
        """
        return self._retried(lambda: self._register_netconf(name, host_key, fingerprint, actor))

    def _register_netconf(self, name: str, host_key: bytes, fingerprint: str,
                          actor: str) -> tuple[Node, bool]:
        with self._tx() as db:
            row = db.execute("SELECT name FROM nodes WHERE kind = ? AND host_key = ?",
                             (NETCONF, host_key)).fetchone()
            if row is None:
                self._name_free(db, name)
                db.execute(
                    "INSERT INTO nodes (name, kind, fingerprint, state, created, host_key)"
                    " VALUES (?, ?, ?, 'pending', ?, ?)",
                    (name, NETCONF, fingerprint, self._now(), host_key),
                )
                self._touch(name)
                self._audit(db, actor, "register", name, f"netconf host key {fingerprint}")
        if row is not None:
            return self.node(row[0]), False
        return self.node(name), True

    @staticmethod
    def _name_free(db: Database, name: str) -> None:
        row = db.execute("SELECT kind FROM nodes WHERE name = ?", (name,)).fetchone()
        if row is not None and row[0] == PAIR:
            raise NameTaken(f"node name {name!r} is the name of a master/clone pair")
        if row is not None:
            raise NameTaken(f"node name {name!r} is already registered with another key")

    def set_state(self, name: str, state: str, actor: str, note: str = "") -> Node:
        if state not in STATES:
            raise RegistryError(f"unknown node state {state!r}")
        with self._tx() as db:
            if db.execute("UPDATE nodes SET state = ? WHERE name = ? AND kind != ?",
                          (state, name, PAIR)).rowcount == 0:
                raise NotFound(f"no node named {name!r}")
            self._touch(name)
            self._audit(db, actor, _STATE_ACTIONS[state], name, note)
        return self.node(name)

    def remove(self, name: str, actor: str, note: str = "") -> None:
        with self._tx() as db:
            self.pair_member_refusal(db, name)
            if db.execute("DELETE FROM nodes WHERE name = ? AND kind != ?",
                          (name, PAIR)).rowcount == 0:
                raise NotFound(f"no node named {name!r}")
            self._count_removal(db)
            self._audit(db, actor, "remove", name, note)

    def set_public(self, name: str, public: bool, actor: str, note: str = "") -> Node:
        with self._tx() as db:
            updated = db.execute("UPDATE nodes SET public = ? WHERE name = ? AND kind != ?",
                                 (int(public), name, PAIR))
            if updated.rowcount == 0:
                raise NotFound(f"no node named {name!r}")
            self._touch(name)
            self._audit(db, actor, "access", name,
                        ("on" if public else "off") + (f" {note}" if note else ""))
        return self.node(name)

    def set_device_access(self, name: str, actor: str, *, host_key: bytes | None = None,
                          device_user: str | None = None, console: str | None = None,
                          clear_console: bool = False) -> Node:
        """Pin the device host key, set the device user or the console template."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM nodes WHERE name = ? AND kind != ?",
                          (name, PAIR)).fetchone() is None:
                raise NotFound(f"no node named {name!r}")
            self._touch(name)
            changes = []
            if host_key is not None:
                db.execute("UPDATE nodes SET host_key = ? WHERE name = ?", (host_key, name))
                changes.append("host key pinned")
            if device_user is not None:
                db.execute("UPDATE nodes SET device_user = ? WHERE name = ?", (device_user, name))
                changes.append(f"device user {device_user}")
            if console is not None or clear_console:
                db.execute("UPDATE nodes SET console = ? WHERE name = ?", (console, name))
                changes.append(f"console {console!r}")
            self._audit(db, actor, "device-access", name, ", ".join(changes))
        return self.node(name)

    def mark_online(self, name: str, peer: str, take: bool = True,
                    forwarding: str | None = None) -> None:
        """`name` is online from this hub. `take` False (a connection without a
        tunnel): a node another hub holds stays that hub's. `forwarding`: the
        service whose lease goes active with it (a tunnel's first forward; one
        transaction, not two)."""
        now = self._now()
        with self._tx() as db:
            self._touch(name)
            if take:
                db.execute(_ONLINE, (now, now, peer, self.hub_id, name))
            else:
                db.execute(_ONLINE + _UNLESS_HELD, (now, now, peer, self.hub_id, name,
                                                    self.hub_id))
            if forwarding is not None:
                db.execute(LEASE_ACTIVE, (1, forwarding, name))

    def mark_offline(self, *names: str) -> None:
        """These nodes went offline (several in one transaction); with a `hub_id`,
        only those this hub holds (another hub may have taken one over)."""
        now = self._now()
        with self._tx() as db:
            self._touch(*names)
            if self.hub_id is None:
                db.executemany(_LEASES_OFF + ")", [(name,) for name in names])
                db.executemany(_OFFLINE, [(now, name) for name in names])
            else:
                db.executemany(_LEASES_OFF + _MINE + ")",
                               [(name, self.hub_id) for name in names])
                db.executemany(_OFFLINE + _MINE, [(now, name, self.hub_id) for name in names])

    def touch(self, name: str) -> None:
        with self._tx(notify=False) as db:
            db.execute("UPDATE nodes SET last_seen = ? WHERE name = ?", (self._now(), name))

    def reset_online(self) -> None:
        """At hub start nothing is connected, whatever a killed hub left behind
        (with a `hub_id`: nothing of this hub's, nor claimed by no hub)."""
        held = "(online = 1 OR id IN (SELECT node_id FROM leases WHERE active = 1))"
        with self._tx() as db:
            if self.hub_id is None:
                self._touch_where(db, held, ())
                db.execute("UPDATE nodes SET online = 0, online_since = NULL WHERE online = 1")
                db.execute("UPDATE leases SET active = 0")
                return
            self._touch_where(db, f"{held} AND (hub IS NULL OR hub = ?)", (self.hub_id,))
            db.execute("UPDATE leases SET active = 0 WHERE node_id IN"
                       " (SELECT id FROM nodes WHERE hub IS NULL OR hub = ?)", (self.hub_id,))
            db.execute("UPDATE nodes SET online = 0, online_since = NULL, hub = NULL"
                       " WHERE online = 1 AND (hub IS NULL OR hub = ?)", (self.hub_id,))

    # -- operators --------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        with self._tx(notify=False) as db:
            self._audit(db, actor, action, target, detail)

    def _audit(self, db: Database, actor: str, action: str, target: str,
               detail: str) -> None:
        db.execute(
            "INSERT INTO audit (time, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
            (self._now(), actor, action, target, detail),
        )

    def audit_log(self, limit: int = 1000) -> list[AuditEntry]:
        rows = self._db.execute(
            f"{select(AUDIT_COLUMNS, 'audit')} ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [AuditEntry.from_row(row) for row in reversed(rows)]
