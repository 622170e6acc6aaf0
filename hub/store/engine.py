"""Where the registry's SQL runs: the embedded SQLite file or a PostgreSQL database.

The store's modules write one SQL dialect: `?` placeholders, `ON CONFLICT`,
`COLLATE NOCASE`, SQLite's case-blind `LIKE`, `ORDER BY rowid`. `SQLite` runs it
as it is; `Postgres` translates it here, the one place that knows the
differences, and keeps the schema version in a table where SQLite has
`PRAGMA user_version`. Both offer the same small connection surface (`Database`).
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from hub.errors import RegistryBusy, RegistryError

POSTGRES_SCHEMES = ("postgresql", "postgres")
CHANNEL = "callhomehub"  # LISTEN/NOTIFY channel of registry changes
# How long a PostgreSQL connection attempt may take, and the wait between
# attempts to get a lost connection back.
CONNECT_TIMEOUT = 5
RECONNECT_INTERVAL = 5.0


class Rows(Protocol):
    """What a statement returns (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """One connection to the registry, in either engine."""

    name: str  # what messages call it (a URL without its password)
    # How often the connection was opened again after a loss: notices (and so
    # changes) may have been missed meanwhile.
    reopened: int

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None: ...

    def begin(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def generation(self) -> tuple[int, int]:
        """(this connection's commits, commits seen from other connections)."""
        ...

    def schema_version(self) -> int: ...

    def set_schema_version(self, version: int) -> None: ...

    def ddl(self, statement: str) -> str:
        """A migration statement in this engine's dialect."""
        ...

    def failure(self, error: Exception) -> str | None:
        """The message for an engine error during migration (None: not one)."""
        ...

    def close(self) -> None: ...


def is_url(target: str) -> bool:
    """A PostgreSQL URL (anything else names a SQLite file)."""
    return "://" in target and target.split("://", 1)[0].lower() in POSTGRES_SCHEMES


def redact(url: str) -> str:
    """The URL without its password, fit for a log line or an error message."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparseable: show no more than the scheme
        return url.split("://", 1)[0] + "://..." if "://" in url else "..."
    if password is None:
        return url
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}"))


def connect(target: str, timer: Callable[[], float]) -> Database:
    """The registry at `target`: a PostgreSQL URL, else the path of a SQLite file."""
    if is_url(target):
        return Postgres(target, timer)
    if "://" in target:
        scheme = target.split("://", 1)[0]
        raise RegistryError(f"registry URL scheme {scheme!r} is not supported: "
                            "use postgresql://USER@HOST/DATABASE, or no --registry for the "
                            "SQLite file in the data directory")
    return SQLite(target)


def keep_private(path: str) -> None:
    """The registry holds bcrypt hashes: create it 0600, and take group and other
    access away from an existing one (and its WAL files, which SQLite creates
    with the database's mode)."""
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            mode = os.stat(name).st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(name, mode & 0o700)


class SQLite:
    """The embedded registry file (WAL); the SQL runs as written."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.reopened = 0  # a file is never reopened
        try:
            keep_private(path)
            # One other thread may use it (the hub's registry thread).
            self._db = sqlite3.connect(path, isolation_level=None, timeout=2.0,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"registry {path} is unreadable or corrupt: {e}") from None
        except OSError as e:
            raise RegistryError(f"registry {path}: {e.strerror}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, params)

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        # SQLite may have rolled the transaction back itself (SQLITE_FULL, some
        # I/O errors): then the error that did it is the one to report.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def generation(self) -> tuple[int, int]:
        # data_version moves when another connection commits.
        return (self._db.total_changes,
                int(self._db.execute("PRAGMA data_version").fetchone()[0]))

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, version: int) -> None:
        self._db.execute(f"PRAGMA user_version = {int(version)}")

    def ddl(self, statement: str) -> str:
        return statement

    def failure(self, error: Exception) -> str | None:
        if isinstance(error, sqlite3.DatabaseError):
            return f"registry {self.name} is unreadable or corrupt: {error}"
        return None

    def close(self) -> None:
        self._db.close()


# -- PostgreSQL ---------------------------------------------------------------

_STRING = re.compile(r"('(?:[^']|'')*')")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """A statement of the store's dialect for psycopg (client-side binding).

    `?` becomes `%s` outside string literals and every `%` is doubled; `LIKE`
    becomes ASCII-case-blind `ILIKE` under the "C" collation (SQLite's LIKE
    ignores ASCII case; PostgreSQL 15 refuses LIKE on a nondeterministic column).
    """
    out = []
    for i, part in enumerate(_STRING.split(sql)):
        part = part.replace("%", "%%")
        if i % 2 == 0:  # outside quotes
            part = part.replace("?", "%s")
            part = re.sub(r"\bLIKE\b", 'COLLATE "C" ILIKE', part)
        out.append(part)
    return "".join(out)


# Column types: SQLite's INTEGER is 64-bit and its REAL a double.
_TYPES = ((re.compile(r"\bINTEGER PRIMARY KEY( AUTOINCREMENT)?"),
           "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
          (re.compile(r"\bINTEGER\b"), "BIGINT"),
          (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
          (re.compile(r"\bBLOB\b"), "BYTEA"))
_CREATE = re.compile(r"^(\s*CREATE TABLE\s+\w+\s*\()", re.IGNORECASE)


def translate_ddl(statement: str) -> str:
    """A migration statement for PostgreSQL. A table without an integer primary
    key gets a `rowid` column (insertion order, as SQLite's implicit rowid)."""
    rowid = _CREATE.match(statement) and "INTEGER PRIMARY KEY" not in statement
    for pattern, replacement in _TYPES:
        statement = pattern.sub(replacement, statement)
    if rowid:
        statement = _CREATE.sub(r"\1rowid BIGINT GENERATED ALWAYS AS IDENTITY, ", statement)
    return statement


# Set up once per database, before the migrations: the case-blind collation the
# schema's COLLATE NOCASE names, and the schema version SQLite keeps in a PRAGMA.
_BOOTSTRAP = (
    "SELECT pg_advisory_xact_lock(7250917)",  # one hub migrates at a time
    "CREATE COLLATION IF NOT EXISTS nocase"
    " (provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
    "CREATE TABLE IF NOT EXISTS callhomehub_schema (version BIGINT NOT NULL)",
    "INSERT INTO callhomehub_schema (version)"
    " SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM callhomehub_schema)",
)


class Postgres:
    """A registry in a PostgreSQL database, over one psycopg connection that
    LISTENs for the change notices of other connections."""

    def __init__(self, url: str, timer: Callable[[], float]) -> None:
        import psycopg  # only a PostgreSQL registry needs it

        self._psycopg = psycopg
        self._url = url
        self.name = redact(url)
        self._timer = timer
        self._commits = 0
        self._others = 0
        self.reopened = 0
        self._wrote = False
        self._in_tx = False
        self._begin = False  # BEGIN not sent yet (see execute)
        self._retry_at = 0.0
        self._conn = self._connect()

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                   cursor_factory=psycopg.ClientCursor)
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as e:
            raise RegistryError(f"registry {self.name}: {self._why(e)}") from None
        self._pid = conn.info.backend_pid
        return conn

    def _why(self, error: Exception) -> str:
        """The first line of a driver error, with no password in it."""
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        try:
            password = urlsplit(self._url).password
        except ValueError:
            password = None
        return text.replace(password, "***") if password else text

    def _live(self) -> Any:
        """The connection, opened again if the last one was lost. After a failed
        attempt, calls fail at once for RECONNECT_INTERVAL: a server that is down
        costs one connection timeout per interval, not one per call."""
        if self._conn.broken or self._conn.closed:
            if self._timer() < self._retry_at:
                raise RegistryError(f"registry {self.name}: unreachable, "
                                    f"trying again every {RECONNECT_INTERVAL:g} s")
            self._retry_at = self._timer() + RECONNECT_INTERVAL
            self._conn = self._connect()
            self._retry_at = 0.0
            self._others += 1  # notices may have been missed meanwhile
            self.reopened += 1
        return self._conn

    def _run(self, call: Callable[[Any], Any]) -> Any:
        errors = self._psycopg.errors
        try:
            return call(self._live())
        except (errors.UniqueViolation, errors.SerializationFailure,
                errors.DeadlockDetected) as e:
            # Another hub wrote the same row at the same time: the caller retries.
            raise RegistryBusy(f"registry {self.name}: {self._why(e)}") from None
        except self._psycopg.OperationalError as e:
            raise RegistryError(f"registry {self.name}: {self._why(e)}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        if self._begin:
            # BEGIN travels with the transaction's first statement: one round
            # trip less per write (the simple query protocol takes both).
            self._begin = False

            def both(conn: Any) -> Any:
                cursor = conn.execute(f"BEGIN; {translate(sql)}", tuple(params))
                cursor.nextset()
                return cursor

            cursor = self._run(both)
        else:
            cursor = self._run(lambda conn: conn.execute(translate(sql), tuple(params)))
        if self._in_tx and cursor.rowcount > 0 and not sql.lstrip().upper().startswith("SELECT"):
            self._wrote = True
        return cursor  # type: ignore[no-any-return]

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(p) for p in params]
        if len(rows) <= 1:  # one row: one statement, and it may carry the BEGIN
            if rows:
                self.execute(sql, rows[0])
            return
        if self._begin:
            self._begin = False
            self._run(lambda conn: conn.execute("BEGIN"))
        self._run(lambda conn: conn.cursor().executemany(translate(sql), rows))
        self._wrote = self._wrote or self._in_tx

    def begin(self) -> None:
        self._in_tx, self._wrote, self._begin = True, False, True

    def commit(self) -> None:
        try:
            if self._begin:  # nothing ran: no transaction to end
                return
            end = f"NOTIFY {CHANNEL}; COMMIT" if self._wrote else "COMMIT"
            self._run(lambda conn: conn.execute(end))
            self._commits += 1
        finally:
            self._in_tx = self._begin = False

    def rollback(self) -> None:
        begun = not self._begin
        self._in_tx = self._begin = False
        if begun and not (self._conn.broken or self._conn.closed):
            self._run(lambda conn: conn.execute("ROLLBACK"))

    def generation(self) -> tuple[int, int]:
        """Counts the notices of other connections received so far, without
        waiting. A lost connection is tried again every RECONNECT_INTERVAL and
        reads as unchanged meanwhile."""
        if self._in_tx:
            return self._commits, self._others
        try:
            for notice in self._live().notifies(timeout=0):
                if notice.pid != self._pid:
                    self._others += 1
        except (RegistryError, self._psycopg.Error):
            pass  # lost: the next call (or poll) opens it again
        return self._commits, self._others

    def schema_version(self) -> int:
        for statement in _BOOTSTRAP:
            self.execute(statement)
        return int(self.execute("SELECT version FROM callhomehub_schema").fetchone()[0])

    def set_schema_version(self, version: int) -> None:
        self.execute("UPDATE callhomehub_schema SET version = ?", (int(version),))

    def ddl(self, statement: str) -> str:
        return translate_ddl(statement)

    def failure(self, error: Exception) -> str | None:
        if isinstance(error, self._psycopg.Error):
            return f"registry {self.name}: {self._why(error)}"
        return None

    def close(self) -> None:
        self._conn.close()
