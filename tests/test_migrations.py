"""Schema migrations: a database written by an older hub opens with its data intact."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest
from postgres import PASSWORD, Cluster

from hub.errors import RegistryError
from hub.intake.monitoring import Status, status
from hub.store.engine import is_url
from hub.store.registry import MIGRATIONS, NETCONF, AuditEntry, Node, Registry, User
from hub.store.rows import AUDIT_COLUMNS, NODE_COLUMNS
from hub.store.schema import load_migrations, statements
from hub.store.sessions import SESSION_COLUMNS, SessionLog, SessionRow

LOW = 50000


def old_database(target: Path | str, version: int) -> None:
    """A database as a hub with only the first `version` migrations left it, with
    data in every table (inserted with that schema's own columns): a SQLite file,
    or a PostgreSQL database (migrated by the registry, as the older hub did)."""
    if isinstance(target, str) and is_url(target):
        old = Registry(target, now=lambda: 0.0, migrations=MIGRATIONS[:version])
        with old.transaction() as tx:
            fill(tx, version)
            # The rows above chose their ids: identity columns go on after them.
            for table in ("nodes", "users"):
                tx.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                           f" (SELECT MAX(id) FROM {table}))")
        old.close()
        return
    db = sqlite3.connect(target)
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    db.execute(f"PRAGMA user_version = {version}")
    fill(db, version)
    db.commit()
    db.close()


def fill(db: Any, version: int) -> None:
    """Rows in every table of schema `version`, through `db.execute(many)`."""
    db.executemany(
        "INSERT INTO nodes (id, name, kind, key_blob, fingerprint, state, created, last_seen,"
        " peer, online, online_since, public, device_user, host_key)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (1, "site-a", "callhome", b"key-a", "SHA256:a", "approved", 100.0, 200.5,
             "192.0.2.7", 1, 150.25, 1, "admin", b"pinned-a"),
            (2, "junos-1", NETCONF, None, "SHA256:j", "pending", 110.0, None, "", 0, None, 0,
             "root", b"host-key-j"),
        ])
    # The schema's defaults fill what an old registration left out.
    db.execute("INSERT INTO nodes (id, name, key_blob, state, created)"
               " VALUES (3, 'Site-B', ?, 'revoked', 120.0)", (b"k-b",))
    db.executemany("INSERT INTO leases (node_id, service, port, active) VALUES (?, ?, ?, ?)",
                   [(1, "ssh", LOW, 1), (1, "http", LOW + 2, 0), (3, "ssh", LOW + 1, 0)])
    db.executemany("INSERT INTO users (id, name, password_hash, created) VALUES (?, ?, ?, ?)",
                   [(1, "alice", "$2b$12$alicehash", 100.0), (2, "bob", None, 101.0)])
    db.executemany("INSERT INTO user_keys (user_id, key_blob, fingerprint) VALUES (?, ?, ?)",
                   [(1, b"ka1", "SHA256:ka1"), (1, b"ka2", "SHA256:ka2"),
                    (2, b"kb", "SHA256:kb")])
    db.executemany("INSERT INTO grants (user_id, pattern) VALUES (?, ?)",
                   [(1, "site-*"), (1, "lab"), (2, "junos-1")])
    db.executemany("INSERT INTO settings (key, value) VALUES (?, ?)",
                   [("callhome-password", "$2b$12$cms"), ("netconf-secret", "s3cret")])
    db.executemany("INSERT INTO audit (time, actor, action, target, detail)"
                   " VALUES (?, ?, ?, ?, ?)", [
                       (100.0, "dev@192.0.2.7", "register", "site-a", "SHA256:a"),
                       (101.0, "cli:root", "approve", "site-a", ""),
                       (102.0, "hub", "lease", "site-a", f"ssh={LOW}")])
    if version >= 2:
        db.execute("INSERT INTO results (node, host, service, code, output, time, received)"
                   " VALUES ('site-a', 'site-a', 'disk', 1, 'DISK WARNING', 300.0, 301.0)")


EXPECTED_NODES = [
    Node(id=1, name="site-a", kind="callhome", key_blob=b"key-a", fingerprint="SHA256:a",
         state="approved", created=100.0, last_seen=200.5, peer="192.0.2.7", online=True,
         online_since=150.25, public=True, device_user="admin", host_key=b"pinned-a",
         forwards={"ssh": LOW, "http": LOW + 2}, console=None, live=frozenset({"ssh"})),
    Node(id=2, name="junos-1", kind=NETCONF, key_blob=None, fingerprint="SHA256:j",
         state="pending", created=110.0, last_seen=None, peer="", online=False,
         online_since=None, public=False, device_user="root", host_key=b"host-key-j",
         forwards={}, console=None),
    Node(id=3, name="Site-B", kind="callhome", key_blob=b"k-b", fingerprint="",
         state="revoked", created=120.0, last_seen=None, peer="", online=False,
         online_since=None, public=False, device_user="root", host_key=None,
         forwards={"ssh": LOW + 1}, console=None),
]


def assert_old_data_reads_back(reg: Registry) -> None:
    assert reg.nodes() == EXPECTED_NODES
    assert reg.node("SITE-A") == EXPECTED_NODES[0]
    assert reg.node_by_key(b"k-b") == EXPECTED_NODES[2]
    assert reg.node_by_host_key(b"host-key-j") == EXPECTED_NODES[1]
    assert reg.users() == [
        User(name="alice", password_hash="$2b$12$alicehash", keys=(b"ka1", b"ka2"),
             fingerprints=("SHA256:ka1", "SHA256:ka2"), allow=("site-*", "lab")),
        User(name="bob", password_hash=None, keys=(b"kb",), fingerprints=("SHA256:kb",),
             allow=("junos-1",)),
    ]
    assert reg.setting("callhome-password") == "$2b$12$cms"
    assert reg.setting("netconf-secret") == "s3cret"
    assert reg.audit_log()[:3] == [
        AuditEntry(time=100.0, actor="dev@192.0.2.7", action="register", target="site-a",
                   detail="SHA256:a"),
        AuditEntry(time=101.0, actor="cli:root", action="approve", target="site-a", detail=""),
        AuditEntry(time=102.0, actor="hub", action="lease", target="site-a",
                   detail=f"ssh={LOW}"),
    ]
    # The leases are still the nodes' own: asked again, nobody moves.
    assert reg.lease("site-a", "ssh", LOW, LOW + 9) == (LOW, False)
    assert reg.lease("site-b", "ssh", LOW, LOW + 9) == (LOW + 1, False)


def user_version(path: Path | str) -> int:
    """The schema version on file: SQLite's user_version, PostgreSQL's table."""
    if isinstance(path, str) and is_url(path):
        import psycopg
        with psycopg.connect(path) as conn:
            row = conn.execute("SELECT version FROM callhomehub_schema").fetchone()
            assert row is not None
            return int(row[0])
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("version", range(1, len(MIGRATIONS)))
def test_old_database_is_upgraded_with_its_data(registry_at: str, version: int) -> None:
    path = registry_at
    old_database(path, version)
    reg = Registry(str(path), now=lambda: 1000.0)
    assert user_version(path) == len(MIGRATIONS)
    assert_old_data_reads_back(reg)
    expected = [Status("site-a", "site-a", "disk", 1, "DISK WARNING", 300.0)]
    assert status(reg) == (expected if version >= 2 else [])
    # The columns added since then work.
    node = reg.set_device_access("site-a", "t", console="pmshell -l {port}")
    assert node.console == "pmshell -l {port}"
    session = SessionLog(reg).begin("alice", "site-a", "192.0.2.9", "shell", 1000.0)
    assert reg.register("site-new", b"key-new", "fp", "t")[0].id == 4  # after the old ids
    reg.close()
    reg = Registry(str(path), now=lambda: 1000.0)
    assert reg.node("site-a").console == "pmshell -l {port}"
    assert [r.id for r in SessionLog(reg).rows(node="site-a")] == [session]


def test_database_from_the_future_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    old_database(path, len(MIGRATIONS))
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 4}")
    db.commit()
    db.close()
    message = (f"registry {path} has schema {len(MIGRATIONS) + 4}, newer than this hub "
               f"({len(MIGRATIONS)}); upgrade callhomehub")
    with pytest.raises(RegistryError, match=f"^{re.escape(message)}$"):
        Registry(str(path), now=lambda: 1000.0)
    assert user_version(path) == len(MIGRATIONS) + 4


def test_failed_upgrade_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    old_database(path, 1)
    # Migration 2 applies, then the next one fails half-way: nothing of either stays.
    broken = ("CREATE TABLE half_done (x INTEGER);"
              " INSERT INTO no_such_table VALUES (1)")
    with pytest.raises(RegistryError, match="no such table: no_such_table"):
        Registry(str(path), now=lambda: 1000.0, migrations=(*MIGRATIONS[:2], broken))
    assert user_version(path) == 1
    db = sqlite3.connect(path)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    columns = {row[1] for row in db.execute("PRAGMA table_info(nodes)")}
    db.close()
    assert "results" not in tables and "half_done" not in tables
    assert "console" not in columns
    # The real upgrade then finds everything where the old hub left it.
    reg = Registry(str(path), now=lambda: 1000.0)
    assert user_version(path) == len(MIGRATIONS)
    assert_old_data_reads_back(reg)


def test_value_columns_match_the_schema(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "hub.sqlite3")
    for script in MIGRATIONS:
        db.executescript(script)

    def columns(table: str) -> list[str]:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]

    # Every column of nodes is read, and each one is a field of Node (beside
    # the leases: all of them, and the services listening now), but the
    # revision: which change last touched the row (hub.store.revisions).
    assert [*NODE_COLUMNS, "revision"] == columns("nodes")
    assert {f.name for f in attrs.fields(Node)} == {*NODE_COLUMNS, "forwards", "live"}
    assert [f.name for f in attrs.fields(AuditEntry)] == list(AUDIT_COLUMNS)
    assert set(AUDIT_COLUMNS) <= set(columns("audit"))
    assert list(SESSION_COLUMNS) == columns("sessions")
    assert [f.name for f in attrs.fields(SessionRow)] == list(SESSION_COLUMNS)


def test_migrations_load_in_number_order(tmp_path: Path) -> None:
    (tmp_path / "0002_second.sql").write_text("CREATE TABLE b (x);\n")
    (tmp_path / "0010_tenth.sql").write_text("never")
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (x);\n")
    (tmp_path / "README.md").write_text("not a migration")
    with pytest.raises(RuntimeError, match=r"not numbered 1\.\.N"):
        load_migrations(tmp_path)
    (tmp_path / "0010_tenth.sql").unlink()
    assert load_migrations(tmp_path) == ("CREATE TABLE a (x);\n", "CREATE TABLE b (x);\n")


def test_shipped_migrations_are_the_package_files() -> None:
    assert load_migrations() == MIGRATIONS
    assert len(MIGRATIONS) == 10
    assert "ALTER TABLE nodes ADD COLUMN console TEXT" in MIGRATIONS[2]
    assert "CREATE TABLE revoked_certificates" in MIGRATIONS[3]
    assert "ALTER TABLE users ADD COLUMN admin" in MIGRATIONS[4]
    assert "CREATE TABLE sessions" in MIGRATIONS[5]
    assert "CREATE TABLE pairs" in MIGRATIONS[6]
    assert "CREATE TABLE hubs" in MIGRATIONS[7]
    assert "ALTER TABLE nodes ADD COLUMN hub TEXT" in MIGRATIONS[7]
    assert "CREATE TABLE web_sessions" in MIGRATIONS[8]
    assert "CREATE TABLE web_links" in MIGRATIONS[8]
    assert "ALTER TABLE nodes ADD COLUMN revision" in MIGRATIONS[9]


def test_statements_skip_comment_lines() -> None:
    script = ("-- a comment; with a semicolon\nCREATE TABLE a (x);\n"
              "  -- another\nCREATE TABLE b (y);\n")
    assert [s.strip() for s in statements(script)] == ["CREATE TABLE a (x)",
                                                       "CREATE TABLE b (y)"]


def test_postgres_schema_version_and_refusal_of_a_newer_one(postgres: Cluster) -> None:
    url = postgres.database()
    Registry(url, now=lambda: 1000.0).close()
    assert user_version(url) == len(MIGRATIONS)
    Registry(url, now=lambda: 1000.0).close()  # opened again: no migration twice
    import psycopg
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE callhomehub_schema SET version = %s", (len(MIGRATIONS) + 4,))
    name = url.replace(PASSWORD, "***")
    message = (f"registry {name} has schema {len(MIGRATIONS) + 4}, newer than this hub "
               f"({len(MIGRATIONS)}); upgrade callhomehub")
    with pytest.raises(RegistryError, match=f"^{re.escape(message)}$"):
        Registry(url, now=lambda: 1000.0)


def test_failed_postgres_upgrade_leaves_the_database_as_it_was(postgres: Cluster) -> None:
    url = postgres.database()
    old_database(url, 1)
    broken = ("CREATE TABLE half_done (x INTEGER);"
              " INSERT INTO no_such_table VALUES (1)")
    with pytest.raises(RegistryError, match='relation "no_such_table" does not exist'):
        Registry(url, now=lambda: 1000.0, migrations=(*MIGRATIONS[:2], broken))
    assert user_version(url) == 1
    import psycopg
    with psycopg.connect(url) as conn:
        tables = {name for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema()")}
        columns = {name for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'nodes'")}
    assert "results" not in tables and "half_done" not in tables
    assert "console" not in columns
    reg = Registry(url, now=lambda: 1000.0)
    assert user_version(url) == len(MIGRATIONS)
    assert_old_data_reads_back(reg)
