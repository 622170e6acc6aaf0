"""The registry's schema: forward-only migrations shipped as numbered `.sql` files.

`migrations/NNNN_name.sql` is migration NNNN; a database's schema version (SQLite's
`PRAGMA user_version`, a table on PostgreSQL: `hub.store.engine`) is the number of
migrations applied to it. Every pending migration runs in one transaction, so an
upgrade that fails half-way leaves the database as it was (on both engines).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from importlib.resources.abc import Traversable

from hub.errors import RegistryError
from hub.store.engine import Database

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def load_migrations(folder: Traversable | None = None) -> tuple[str, ...]:
    """The migration scripts in order, from `folder` (the shipped `migrations/`)."""
    folder = files("hub.store") / "migrations" if folder is None else folder
    numbered = sorted((int(m.group(1)), entry) for entry in folder.iterdir()
                      if (m := _NAME.match(entry.name)))
    # A gap or a duplicate number would renumber every later schema version.
    if [number for number, _ in numbered] != list(range(1, len(numbered) + 1)):
        raise RuntimeError(f"migrations in {folder} are not numbered 1..N: "
                           f"{[entry.name for _, entry in numbered]}")
    return tuple(entry.read_text(encoding="utf-8") for _, entry in numbered)


MIGRATIONS: tuple[str, ...] = load_migrations()


def statements(script: str) -> list[str]:
    """The statements of one migration script.

    `executescript` would commit the enclosing transaction, so the script is
    split on `;` (whole-line `--` comments dropped first: they may hold one).
    """
    code = "\n".join(line for line in script.splitlines()
                     if not line.lstrip().startswith("--"))
    return [statement for statement in code.split(";") if statement.strip()]


@contextmanager
def transaction(db: Database) -> Iterator[Database]:
    """One write transaction (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: `BEGIN`, and
    a change notice at commit)."""
    db.begin()
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


def migrate(db: Database, migrations: Sequence[str] = MIGRATIONS) -> None:
    """Bring the database to `len(migrations)`, all or nothing."""
    try:
        with transaction(db):
            current = db.schema_version()
            if current > len(migrations):
                raise RegistryError(
                    f"registry {db.name} has schema {current}, newer than this hub "
                    f"({len(migrations)}); upgrade callhomehub"
                )
            for version, script in enumerate(migrations[current:], start=current + 1):
                for statement in statements(script):
                    db.execute(db.ddl(statement))
                db.set_schema_version(version)
    except RegistryError:
        raise
    except Exception as e:
        message = db.failure(e)
        if message is None:
            raise
        raise RegistryError(message) from None
