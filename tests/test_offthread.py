"""The registry thread: calls in order, off the caller's thread, bounded, stopped cleanly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.python.failure import Failure

from hub.errors import NotFound, RegistryError
from hub.store.latency import Latency
from hub.store.offthread import RegistryThread
from hub.store.registry import Registry


def opener(tmp_path: Path, clock: MemoryReactorClock) -> tuple[Registry, RegistryThread]:
    """A registry for the test to read, and a thread owning its own connection."""
    path = str(tmp_path / "hub.sqlite3")
    mine = Registry(path, now=clock.seconds)
    thread = RegistryThread(lambda: Registry(path, now=clock.seconds), None, clock)
    return mine, thread


def result(d: defer.Deferred[object]) -> list[object]:
    out: list[object] = []
    d.addBoth(out.append)
    return out


def texts(logged: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in logged]


def test_calls_run_in_order_off_the_callers_thread(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    mine, thread = opener(tmp_path, clock)
    mine.register("n1", b"k1", "SHA256:x", "test")
    for i in range(50):
        thread.write(Registry.audit, "hub", "step", "n1", str(i))
    thread.write(Registry.mark_online, "n1", "192.0.2.1")
    thread.write(Registry.mark_offline, "n1")
    where = result(thread.call(lambda r: threading.current_thread().name))
    node = result(thread.call(Registry.node, "n1"))
    assert where == [] and node == []  # nothing fires until delivered on "the reactor"
    thread.drain()
    assert where == ["registry"]
    assert [e.detail for e in mine.audit_log() if e.action == "step"] == [
        str(i) for i in range(50)]
    assert not mine.node("n1").online  # offline after online, as queued
    assert node[0].name == "n1"  # type: ignore[attr-defined]


def test_a_failed_call_fails_its_deferred_and_a_failed_write_is_logged(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    mine, thread = opener(tmp_path, clock)
    missing = result(thread.call(Registry.node, "ghost"))
    thread.write(Registry.set_state, "ghost", "approved", "test")
    thread.write(Registry.audit, "hub", "after", "x")
    thread.drain()
    assert isinstance(missing[0], Failure) and missing[0].check(NotFound)
    assert any("registry write set_state('ghost', 'approved', 'test') failed: "
               "no node named 'ghost'; the hub goes on without it" in t for t in texts(logged))
    assert [e.action for e in mine.audit_log()] == ["after"]  # the next write still ran


def test_over_the_limit_it_warns_once_a_minute_and_drops_only_refreshes(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    mine, thread = opener(tmp_path, clock)
    thread.limit = 3
    mine.register("n1", b"k1", "SHA256:x", "test")
    release = threading.Event()
    thread.write(lambda r: release.wait(10))  # the database "stalls"
    for i in range(5):
        thread.write(Registry.audit, "hub", "queued", "n1", str(i))
    thread.refresh(Registry.touch, "n1")
    clock.advance(30)
    thread.write(Registry.audit, "hub", "queued", "n1", "5")
    behind = [t for t in texts(logged) if "registry is behind" in t]
    assert len(behind) == 1 and "calls waiting (limit 3)" in behind[0]
    clock.advance(31)
    thread.write(Registry.audit, "hub", "queued", "n1", "6")
    assert len([t for t in texts(logged) if "registry is behind" in t]) == 2
    release.set()
    thread.drain()
    assert thread.skipped == 1 and mine.node("n1").last_seen is None  # the refresh alone
    assert [e.detail for e in mine.audit_log() if e.action == "queued"] == [
        str(i) for i in range(7)]


def test_stop_waits_for_queued_writes_then_refuses_calls(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    mine, thread = opener(tmp_path, clock)
    thread.startService()
    release = threading.Event()
    thread.write(lambda r: release.wait(10))
    thread.write(Registry.audit, "hub", "last-words", "x")
    stopped = result(thread.stopService())
    late = result(thread.call(Registry.nodes))
    assert isinstance(late[0], Failure) and late[0].check(RegistryError)
    assert "after the hub stopped" in late[0].getErrorMessage()
    thread.write(Registry.mark_offline, "a")  # connections closing as the process exits
    thread.write(Registry.mark_offline, "b")
    assert [t for t in texts(logged) if "registry" in t] == [
        "registry closed: changes made as the hub stops (nodes going offline) are not "
        "written; the next start marks every node offline"]
    assert stopped == []
    release.set()
    thread.drain()
    assert stopped == [None]
    assert [e.action for e in mine.audit_log()] == ["last-words"]
    assert thread._thread is not None
    thread._thread.join(5)
    assert not thread._thread.is_alive()


def test_a_registry_that_cannot_be_opened_fails_every_call_in_words(tmp_path: Path) -> None:
    clock = MemoryReactorClock()

    def broken() -> Registry:
        raise RegistryError("registry /x is unreadable or corrupt: file is not a database")

    thread = RegistryThread(broken, None, clock)
    out = result(thread.call(Registry.nodes))
    thread.drain()
    assert isinstance(out[0], Failure)
    assert out[0].getErrorMessage() == ("the registry could not be opened: registry /x is "
                                        "unreadable or corrupt: file is not a database")


@pytest_twisted.ensureDeferred
async def test_results_fire_on_the_reactor_thread(tmp_path: Path) -> None:
    path = str(tmp_path / "hub.sqlite3")
    Registry(path, now=reactor.seconds).register(  # type: ignore[attr-defined]
        "n1", b"k1", "SHA256:x", "test")
    thread = RegistryThread(lambda: Registry(path, now=reactor.seconds),  # type: ignore
                            reactor, reactor)  # type: ignore[arg-type]
    fired_on: list[str] = []
    d = thread.call(Registry.node, "n1")
    d.addCallback(lambda node: fired_on.append(threading.current_thread().name) or node)
    node = await d
    assert node.name == "n1" and fired_on == [threading.main_thread().name]
    await thread.stopService()


def test_drain_gives_up_at_its_deadline(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    _, thread = opener(tmp_path, clock)
    release = threading.Event()
    thread.write(lambda r: release.wait(10))
    with pytest.raises(TimeoutError, match="still waiting"):
        thread.drain(timeout=0.05)
    release.set()
    thread.drain()


def test_offline_writes_queued_back_to_back_are_one_transaction_in_order(
        tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    mine, thread = opener(tmp_path, clock)
    names = [f"n{i}" for i in range(200)]
    for i, name in enumerate(names):
        mine.register(name, f"k{i}".encode(), "SHA256:x", "test")
        mine.mark_online(name, "192.0.2.1")

    def generation() -> int:
        return int(mine.setting("generation") or 0)

    before = generation()
    held = threading.Event()
    thread.call(lambda r: held.wait(10))  # the thread busy while the writes queue up
    offline = [result(thread.call(Registry.mark_offline, name)) for name in names[:150]]
    thread.write(Registry.mark_online, "n0", "192.0.2.2")  # between them: order kept
    for name in names[150:]:
        thread.write(Registry.mark_offline, name)
    held.set()
    thread.drain()
    # Two transactions: 150 offline (calls, coalesced), then n0 online again and 50
    # offline (writes, one batch, in order); every caller answered.
    assert generation() - before == 2
    assert all(done == [None] for done in offline)
    online = {n.name for n in mine.nodes() if n.online}
    assert online == {"n0"}
    assert thread.queued() == 0


def held_thread(tmp_path: Path, clock: MemoryReactorClock
                ) -> tuple[Registry, RegistryThread, threading.Event, Latency]:
    """A registry thread kept busy until the event is set, so that writes queue up,
    and the latency histogram of the registry it owns."""
    mine, thread = opener(tmp_path, clock)
    latency = result(thread.call(lambda r: r.latency))
    thread.drain()
    held = threading.Event()
    thread.call(lambda r: held.wait(10))
    return mine, thread, held, latency[0]  # type: ignore[return-value]


def test_writes_queued_back_to_back_commit_once_each_in_its_own_savepoint(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    mine, thread, held, latency = held_thread(tmp_path, clock)
    for i in range(3):
        mine.register(f"n{i}", f"k{i}".encode(), "SHA256:x", "test")
    generation = int(mine.setting("generation") or 0)

    def half_done(r: Registry) -> None:
        # A write that fails after its first statement: that statement is undone.
        with r.transaction() as db:
            db.execute("INSERT INTO audit (time, actor, action, target, detail)"
                       " VALUES (0, 'hub', 'half', 'x', '')")
            raise RegistryError("refused half-way")

    for i in range(3):
        thread.write(Registry.mark_online, f"n{i}", "192.0.2.1")
        thread.write(Registry.audit, "hub", "step", f"n{i}", str(i))
    thread.write(half_done)
    thread.write(Registry.set_state, "ghost", "approved", "test")
    thread.write(Registry.audit, "hub", "last", "x")
    thread.write(Registry.set_state, "n2", "approved", "test")
    transactions = sum(latency.counts)  # read while the thread waits
    held.set()
    thread.drain()
    # One transaction for the ten writes: the latency histogram counted one, and
    # `generation` moved once.
    assert sum(latency.counts) - transactions == 1
    assert int(mine.setting("generation") or 0) == generation + 1
    assert [e.action for e in mine.audit_log() if e.actor == "hub"] == [
        "step", "step", "step", "last"]
    assert all(mine.node(f"n{i}").online for i in range(3))
    assert mine.node("n2").state == "approved"
    # The other processes see each node the batch touched as changed.
    assert {n.name for n in mine.node_changes(generation).nodes} == {"n0", "n1", "n2"}
    failed = [t for t in texts(logged) if "failed" in t]
    assert failed == [
        "registry write half_done() failed: refused half-way; the hub goes on without it",
        "registry write set_state('ghost', 'approved', 'test') failed: no node named "
        "'ghost'; the hub goes on without it"]


def test_a_batch_whose_transaction_is_lost_writes_each_alone(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    """A write that takes the batch's transaction down with it (SQLite rolls a whole
    transaction back on some I/O errors): nothing of the batch is committed, so each
    write runs again in its own transaction, and only that one fails."""
    clock = MemoryReactorClock()
    mine, thread, held, _ = held_thread(tmp_path, clock)
    mine.register("n1", b"k1", "SHA256:x", "test")

    def ruinous(r: Registry) -> None:
        with r.transaction() as db:
            db.execute("ROLLBACK")  # what SQLite does itself on SQLITE_FULL
            raise RegistryError("disk full")

    thread.write(Registry.audit, "hub", "before", "x")
    thread.write(ruinous)
    thread.write(Registry.mark_online, "n1", "192.0.2.1")
    thread.write(Registry.audit, "hub", "after", "x")
    held.set()
    thread.drain()
    assert [e.action for e in mine.audit_log() if e.actor == "hub"] == ["before", "after"]
    assert mine.node("n1").online
    lines = texts(logged)
    assert any(t.startswith("registry batch of 4 writes broken (a write of the batch failed "
                            "(disk full) and could not be undone alone: ") and
               t.endswith("; each is written alone") for t in lines), lines
    assert [t for t in lines if "failed:" in t and t.startswith("registry write")] == [
        "registry write ruinous() failed: disk full; the hub goes on without it"]


def test_a_batch_whose_commit_fails_fails_every_write_in_one_line(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    """The commit refused (here a deferred foreign key, which SQLite checks at the
    commit): no write of the batch landed, and one line says so."""
    clock = MemoryReactorClock()
    mine, thread, held, _ = held_thread(tmp_path, clock)
    mine.register("n1", b"k1", "SHA256:x", "test")

    def dangling(r: Registry) -> None:
        with r.transaction() as db:
            db.execute("PRAGMA defer_foreign_keys = ON")
            db.execute("INSERT INTO leases (node_id, service, port) VALUES (999, 'ssh', 50000)")

    thread.write(Registry.audit, "hub", "before", "x")
    thread.write(dangling)
    thread.write(Registry.mark_online, "n1", "192.0.2.1")
    held.set()
    thread.drain()
    assert [e.action for e in mine.audit_log() if e.actor == "hub"] == []
    assert not mine.node("n1").online
    assert [t for t in texts(logged) if "failed" in t] == [
        "registry write a batch of 3 writes: audit('hub', 'before', 'x'), dangling(), ... "
        "failed: FOREIGN KEY constraint failed; the hub goes on without it"]


def test_a_call_is_never_in_a_batch_and_waits_its_turn(tmp_path: Path) -> None:
    """A caller waiting for its answer runs alone, after the writes queued before it,
    and the writes after it form their own batch."""
    clock = MemoryReactorClock()
    mine, thread, held, _ = held_thread(tmp_path, clock)
    mine.register("n1", b"k1", "SHA256:x", "test")
    thread.write(Registry.mark_online, "n1", "192.0.2.1")
    seen = result(thread.call(lambda r: (r._batch is None, r.node("n1").online)))
    thread.write(Registry.mark_offline, "n1")
    held.set()
    thread.drain()
    assert seen == [(True, True)]
    assert not mine.node("n1").online


def test_a_failed_batch_of_offline_writes_is_logged_once_naming_the_batch(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    """Thousands of tunnels closing while the database refuses: one line, not thousands."""
    clock = MemoryReactorClock()

    class Refusing(Registry):
        def mark_offline(self, *names: str) -> None:
            raise RegistryError("database is locked")

    path = str(tmp_path / "hub.sqlite3")
    thread = RegistryThread(lambda: Refusing(path, now=clock.seconds), None, clock)
    held = threading.Event()
    thread.call(lambda r: held.wait(10))  # the thread busy while the writes queue up
    for i in range(100):
        thread.write(Registry.mark_offline, f"n{i}")
    thread.write(Registry.audit, "hub", "between", "x")
    thread.write(Registry.mark_offline, "alone")
    held.set()
    thread.drain()
    failed = [t for t in texts(logged) if "failed" in t]
    assert failed == [
        "registry write mark_offline('n0', 'n1', 'n2', and 97 more) failed: database is "
        "locked; the hub goes on without it",
        "registry write mark_offline('alone') failed: database is locked; the hub goes on "
        "without it"]


def test_background_reads_after_the_stop_pass_quietly(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    """The registry poll and the fleet view's read, made as the hub stops (after its
    registry thread stopped), log no error: every normal stop wrote two #error lines
    now and then. A call after the stop still fails, as `RegistryStopped`."""
    from memory_hub import make_hub

    from hub.cluster.view import FleetView
    from hub.errors import RegistryStopped

    clock = MemoryReactorClock()
    (tmp_path / "registry").mkdir()
    _, thread = opener(tmp_path / "registry", clock)
    thread.startService()
    result(thread.stopService())
    thread.drain()
    late = result(thread.call(Registry.nodes))
    assert isinstance(late[0], Failure) and late[0].check(RegistryStopped)
    (tmp_path / "hub").mkdir()
    hub = make_hub(tmp_path / "hub", clock)
    hub.calls = thread
    hub.sync()
    FleetView(thread).refresh()
    assert [e for e in logged if e.get("log_level") == LogLevel.error] == []


def test_a_failed_poll_still_says_so(tmp_path: Path, logged: list[LogEvent]) -> None:
    from memory_hub import make_hub

    class Failing:
        def call(self, fn: object, *args: object) -> defer.Deferred[object]:
            return defer.fail(RegistryError("database is locked"))

    hub = make_hub(tmp_path, MemoryReactorClock())
    hub.calls = Failing()  # type: ignore[assignment]
    hub.sync()
    assert "registry poll failed: database is locked" in texts(logged)
