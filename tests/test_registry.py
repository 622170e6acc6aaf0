from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from helpers import wait_for

from hub.errors import NameTaken, NotFound, RegistryError
from hub.store.registry import MIGRATIONS, Registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reg(registry_at: str) -> Registry:
    """A registry on each engine (SQLite, PostgreSQL)."""
    return Registry(registry_at, now=Clock())


@pytest.fixture
def sqlite_reg(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "hub.sqlite3"), now=Clock())


def test_schema_is_versioned_and_wal(tmp_path: Path, sqlite_reg: Registry) -> None:
    db = sqlite3.connect(tmp_path / "hub.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Opening again runs no migration twice.
    Registry(str(tmp_path / "hub.sqlite3"), now=Clock()).close()


def test_newer_schema_is_refused(tmp_path: Path, sqlite_reg: Registry) -> None:
    sqlite_reg.close()
    db = sqlite3.connect(tmp_path / "hub.sqlite3")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    with pytest.raises(RegistryError, match="newer than this hub"):
        Registry(str(tmp_path / "hub.sqlite3"), now=Clock())


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="unreadable or corrupt"):
        Registry(str(path), now=Clock())


def test_register_same_key_twice_and_name_conflicts(reg: Registry) -> None:
    node, created = reg.register("site-a", b"key1", "SHA256:1", "test")
    assert created and node.state == "pending" and node.fingerprint == "SHA256:1"
    again, created = reg.register("other-name", b"key1", "SHA256:1", "test")
    assert not created and again.name == "site-a"
    with pytest.raises(NameTaken):
        reg.register("SITE-A", b"key2", "SHA256:2", "test")
    assert [n.name for n in reg.nodes()] == ["site-a"]
    assert reg.node("Site-A").name == "site-a"
    assert reg.node_by_key(b"key1") == reg.node("site-a")
    assert reg.node_by_key(b"nope") is None


def test_states_public_and_audit(reg: Registry) -> None:
    reg.register("site-a", b"key1", "SHA256:1", "dev@1.2.3.4")
    assert reg.set_state("site-a", "approved", "cli:root").state == "approved"
    assert reg.set_public("site-a", True, "cli:root").public
    assert reg.set_state("site-a", "revoked", "cli:root").state == "revoked"
    with pytest.raises(NotFound):
        reg.set_state("nope", "approved", "cli:root")
    with pytest.raises(RegistryError):
        reg.set_state("site-a", "bogus", "cli:root")
    reg.remove("site-a", "cli:root")
    with pytest.raises(NotFound):
        reg.node("site-a")
    log = [(e.actor, e.action, e.target, e.detail) for e in reg.audit_log()]
    assert log == [("dev@1.2.3.4", "register", "site-a", "SHA256:1"),
                   ("cli:root", "approve", "site-a", ""),
                   ("cli:root", "access", "site-a", "on"),
                   ("cli:root", "revoke", "site-a", ""),
                   ("cli:root", "remove", "site-a", "")]


def test_online_state_and_reset(reg: Registry) -> None:
    reg.register("site-a", b"key1", "SHA256:1", "t")
    reg.mark_online("site-a", "192.0.2.7")
    node = reg.node("site-a")
    assert node.online and node.peer == "192.0.2.7" and node.online_since == 1000.0
    reg.reset_online()
    assert not reg.node("site-a").online


def test_users_and_grants(reg: Registry) -> None:
    user = reg.add_user("alice", "$2b$hash", [(b"k1", "SHA256:k1")], ["site-*", "lab"], "t")
    assert (user.name, user.keys, user.allow) == ("alice", (b"k1",), ("site-*", "lab"))
    with pytest.raises(NameTaken):
        reg.add_user("ALICE", None, [], [], "t")
    assert [u.name for u in reg.users()] == ["alice"]
    reg.del_user("alice", "t")
    with pytest.raises(NotFound):
        reg.user("alice")


def test_changes_by_another_process_are_noticed(registry_at: str, reg: Registry) -> None:
    assert not reg.changed()
    cli = Registry(registry_at, now=Clock())
    cli.register("site-a", b"key1", "SHA256:1", "cli")
    # PostgreSQL's notice arrives a moment after the commit; SQLite's at once.
    deadline = time.monotonic() + 2
    while not reg.changed():
        assert time.monotonic() < deadline, "the change was not noticed within 2 s"
    assert not reg.changed()
    # The hub's own writes are not "changes by others".
    reg.touch("site-a")
    assert not reg.changed()


def test_failed_transaction_leaves_nothing(reg: Registry) -> None:
    reg.register("site-a", b"key1", "SHA256:1", "t")
    with pytest.raises(NameTaken):
        reg.register("site-a", b"key2", "SHA256:2", "t")
    assert len(reg.audit_log()) == 1


def test_lowest_free_port_agrees_with_the_pure_rule(reg: Registry) -> None:
    import random

    from hub.rules.ports import choose_port
    rng = random.Random(7)
    for i in range(60):
        reg.register(f"n{i}", f"k{i}".encode(), "fp", "t")
    taken: set[int] = set()
    for i in range(60):
        low, high = 1000, 1000 + rng.randrange(40, 80)
        expected = choose_port(taken, low, high)
        if expected is None:
            break
        port, new = reg.lease(f"n{i}", "ssh", low, high)
        assert (port, new) == (expected, True)
        taken.add(port)
        if rng.random() < 0.3:  # free some ports again, leaving holes
            victim = rng.choice(sorted(taken))
            owner = next(n.name for n in reg.nodes() if victim in n.forwards.values())
            reg.remove(owner, "t")
            taken.discard(victim)


def test_the_registry_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    reg = Registry(str(path), now=lambda: 0.0)
    reg.set_setting("callhome_password", "$2b$12$hash", "test")
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "hub.sqlite3": 0o600, "hub.sqlite3-wal": 0o600, "hub.sqlite3-shm": 0o600}
    reg.close()
    path.chmod(0o644)  # as hubs before this one created it
    Registry(str(path), now=lambda: 0.0).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_pending_leases_expire_once_the_node_stayed_away(registry_at: str) -> None:
    clock = Clock()
    reg = Registry(registry_at, now=clock)
    for name in ("squat", "device", "live"):
        reg.register(name, name.encode(), "fp", "test")
        reg.lease(name, "ssh", 50000, 50099)
        reg.mark_online(name, "192.0.2.1")
    reg.lease("squat", "http", 50000, 50099)
    reg.set_state("device", "approved", "test")
    reg.mark_offline("squat", "device")  # "live" stays online, its lease inactive
    clock.now += 100
    assert reg.expire_pending_leases(before=clock.now - 100) == []
    assert reg.expire_pending_leases(before=clock.now - 99) == [
        ("squat", "ssh", 50000), ("squat", "http", 50003)]
    assert reg.node("squat").forwards == {}
    assert reg.node("device").forwards == {"ssh": 50001}
    assert reg.node("live").forwards == {"ssh": 50002}
    assert [e.detail for e in reg.audit_log() if e.action == "lease-expired"] == [
        "ssh=50000", "http=50003"]
    # The released ports are free again.
    reg.register("next", b"next", "fp", "test")
    assert reg.lease("next", "ssh", 50000, 50099) == (50000, True)


def test_a_kept_lease_is_no_change_for_other_hubs(registry_at: str) -> None:
    """A device calling back gets its port again without a write: in a reconnect
    storm every other hub and worker read each device's node again for nothing."""
    hub = Registry(registry_at, now=lambda: 0.0)
    other = Registry(registry_at, now=lambda: 0.0)
    hub.register("site-a", b"key-a", "fp", "t")
    port, new = hub.lease("site-a", "ssh", 50000, 50099)
    # PostgreSQL's change notices arrive on their own time.
    assert new and wait_for(other.changed, what="the new lease noticed")
    assert hub.lease("site-a", "ssh", 50000, 50099) == (port, False)
    assert not other.changed()
    # A kept port another program holds is given up: that lease is a change.
    assert hub.lease("site-a", "ssh", 50000, 50099, avoid={port}) == (port + 1, True)
    assert wait_for(other.changed, what="the moved lease noticed")
    assert other.node("site-a").forwards == {"ssh": port + 1}
    with pytest.raises(NotFound):
        hub.lease("nobody", "ssh", 50000, 50099)
    hub.close()
    other.close()


def test_a_batch_commits_its_writes_once_and_undoes_a_failed_one_alone(reg: Registry) -> None:
    """`Registry.batch`, on each engine: a write that fails half-way (here on a unique
    name, which leaves a PostgreSQL transaction unusable until its savepoint is rolled
    back) is undone alone; the writes around it land in one transaction."""
    reg.register("n1", b"k1", "SHA256:1", "test")
    reg.register("n2", b"k2", "SHA256:2", "test")
    generation = int(reg.setting("generation") or 0)
    transactions = sum(reg.latency.counts)
    with reg.batch():
        reg.mark_online("n1", "192.0.2.1")
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            with reg.transaction() as db:
                db.execute("INSERT INTO audit (time, actor, action, target, detail)"
                           " VALUES (0, 'hub', 'half', 'x', '')")
                db.execute("INSERT INTO nodes (name, key_blob, fingerprint, state, created)"
                           " VALUES ('n2', ?, 'SHA256:3', 'pending', 0)", (b"k3",))
        with pytest.raises(NotFound):
            reg.set_state("ghost", "approved", "test")
        reg.set_state("n2", "approved", "test")
        reg.audit("hub", "after", "x")
    assert reg.node("n1").online and reg.node("n2").state == "approved"
    assert [e.action for e in reg.audit_log() if e.actor == "hub"] == ["after"]
    assert int(reg.setting("generation") or 0) == generation + 1
    assert sum(reg.latency.counts) == transactions + 1
    assert {n.name for n in reg.node_changes(generation).nodes} == {"n1", "n2"}
    with reg.batch(), pytest.raises(RegistryError, match="do not nest"):
        with reg.batch():
            pass
    reg.mark_offline("n1")  # after a batch, writes are transactions of their own again
    assert not reg.node("n1").online
