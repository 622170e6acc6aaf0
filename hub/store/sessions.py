"""The `sessions` table: one row per operator session on a device (gateway, chooser,
web terminal), with where its recording is. Kept in the registry file, next to
the audit log (which keeps its own `gateway` entry for each session)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from attrs import frozen

from hub.rules.retention import Kept

SESSION_COLUMNS = ("id", "user", "node", "source", "kind", "command", "started", "ended",
                   "exit_status", "exit_signal", "bytes_to_device", "bytes_from_device",
                   "recording", "recording_bytes", "truncated")


class Store(Protocol):
    """What of the registry this uses (`hub.store.registry.Registry`)."""

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self) -> Any: ...


def _quoted(column: str) -> str:
    return f'"{column}"' if column == "user" else column


@frozen
class SessionRow:
    id: int
    user: str
    node: str
    source: str
    kind: str
    command: str | None
    started: float
    ended: float | None
    exit_status: int | None
    exit_signal: str | None
    bytes_to_device: int
    bytes_from_device: int
    recording: str | None
    recording_bytes: int
    truncated: bool

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> SessionRow:
        values = dict(zip(SESSION_COLUMNS, row, strict=True))
        values["truncated"] = bool(values["truncated"])
        return cls(**values)


# `user` is quoted: PostgreSQL reads a bare `user` as CURRENT_USER.
_SELECT = f"SELECT {', '.join(_quoted(c) for c in SESSION_COLUMNS)} FROM sessions"  # noqa: S608 (constant names)


class SessionLog:
    """Reads and writes the `sessions` table; each call is one transaction."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def begin(self, user: str, node: str, source: str, kind: str, started: float,
              command: str | None = None,
              recording: Callable[[int], str] | None = None) -> int:
        """A new row; `recording` names the session's recording file from its id."""
        with self._store.transaction() as db:
            (session,) = db.execute(
                'INSERT INTO sessions ("user", node, source, kind, command, started)'
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (user, node, source, kind, command, started)).fetchone()
            session = int(session)
            if recording is not None:
                db.execute("UPDATE sessions SET recording = ? WHERE id = ?",
                           (recording(session), session))
            return session

    def finish(self, session: int, ended: float, exit_status: int | None,
               exit_signal: str | None, to_device: int, from_device: int,
               recording_bytes: int, truncated: bool) -> None:
        with self._store.transaction() as db:
            db.execute(
                "UPDATE sessions SET ended = ?, exit_status = ?, exit_signal = ?,"
                " bytes_to_device = ?, bytes_from_device = ?, recording_bytes = ?,"
                " truncated = CASE WHEN ? = 1 THEN 1 ELSE truncated END WHERE id = ?",
                (ended, exit_status, exit_signal, to_device, from_device, recording_bytes,
                 int(truncated), session))

    def mark_truncated(self, session: int) -> None:
        with self._store.transaction() as db:
            db.execute("UPDATE sessions SET truncated = 1 WHERE id = ?", (session,))

    def forget_recording(self, session: int) -> None:
        """The recording was deleted: the row keeps the rest."""
        with self._store.transaction() as db:
            db.execute("UPDATE sessions SET recording = NULL WHERE id = ?", (session,))

    def get(self, session: int) -> SessionRow | None:
        rows = self._store.query(f"{_SELECT} WHERE id = ?", (session,))
        return SessionRow.from_row(rows[0]) if rows else None

    def rows(self, node: str | None = None, user: str | None = None) -> list[SessionRow]:
        where, params = [], []
        if node is not None:
            where.append("node = ? COLLATE NOCASE")
            params.append(node)
        if user is not None:
            where.append('"user" = ?')
            params.append(user)
        sql = _SELECT + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        return [SessionRow.from_row(r) for r in self._store.query(sql, tuple(params))]

    def recorded(self) -> list[tuple[Kept, str]]:
        """Every session whose recording is on file, with its path."""
        return [(Kept(int(i), float(s), int(b)), str(p)) for i, s, b, p in self._store.query(
            "SELECT id, started, recording_bytes, recording FROM sessions"
            " WHERE recording IS NOT NULL ORDER BY started")]
