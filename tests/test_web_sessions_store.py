"""Web sessions and sign-in links in the registry (hub.store.websessions through
hub.web.sessions and hub.web.weblinks): hashes only, lifetimes, one spend, the
throttled "last used" write, the ends a user change brings, pruning."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from hub.app.config import build_config
from hub.app.console import endpoint_port, worker_weblinks
from hub.rules.logins import OperatorLogin
from hub.store.offthread import InlineCalls
from hub.store.registry import Registry
from hub.web.sessions import SessionStore
from hub.web.weblinks import WebLinks


class Now:
    """A store whose registry calls run inline (`InlineCalls`): its answers taken
    from their Deferreds, fired on return."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._inner, name)
        if not callable(found):
            return found

        def now(*args: Any, **kwargs: Any) -> Any:
            result = found(*args, **kwargs)
            if not isinstance(result, defer.Deferred):
                return result
            got: list[Any] = []
            result.addBoth(got.append)
            assert got, "the Deferred has not fired"
            if isinstance(got[0], Failure):
                got[0].raiseException()
            return got[0]
        return now

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class Hub:
    """One hub's view: its own registry connection on the shared file, its clock."""

    def __init__(self, path: Path, clock: MemoryReactorClock) -> None:
        self.registry = Registry(str(path), now=clock.seconds)
        calls = InlineCalls(self.registry)
        self.sessions = Now(SessionStore(calls, clock, 1800, 43200))
        self.links = Now(WebLinks(calls, clock, None, True, lambda: 8443))


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    return clock


@pytest.fixture
def path(registry_at: str) -> str:
    """The shared registry, on each engine (a SQLite file, a PostgreSQL schema)."""
    return registry_at


def alice(hub: Hub, key: bytes = b"alice-key") -> OperatorLogin:
    user = hub.registry.user("alice") if hub.registry.users() else hub.registry.add_user(
        "alice", "$2b$04$hash", [(key, "SHA256:k")], ["*"], "test")
    return OperatorLogin("alice", identity=user.identity, credential=key)


# Each table's columns as migration 0009 made them (PostgreSQL adds a rowid).
COLUMNS = {"web_sessions": "id_hash, browse_hash, user_name, login_id, login_created,"
                           " credential, address, created, used, expires",
           "web_links": "token_hash, user_name, login_id, login_created, credential, expires"}


def rows(hub: Hub, table: str) -> list[tuple[object, ...]]:
    return hub.registry.query(f"SELECT {COLUMNS[table]} FROM {table}")


def test_the_registry_keeps_hashes_only(path: Path, clock: MemoryReactorClock) -> None:
    hub = Hub(path, clock)
    session = hub.sessions.start(alice(hub), "192.0.2.7")
    url = hub.links.issue(alice(hub), "hub.example")
    token = url.rsplit("/", 1)[1]
    assert session.id is not None
    secrets = [session.id, session.browse, session.csrf, token]
    stored = repr(rows(hub, "web_sessions") + rows(hub, "web_links"))
    assert not [s for s in secrets if s in stored]
    [row] = rows(hub, "web_sessions")
    assert row[0] == hashlib.sha256(session.id.encode()).hexdigest() == session.key
    [link] = rows(hub, "web_links")
    assert link[0] == hashlib.sha256(token.encode()).hexdigest()
    # What the row holds is enough for another hub, given the cookie.
    found = Hub(path, clock).sessions.get(session.id)
    assert found is not None and found.csrf == session.csrf
    assert found.login == session.login and found.login.credential == b"alice-key"
    assert found.login.identity == session.login.identity


def test_a_session_made_on_one_hub_works_on_another_and_after_a_restart(
        path: Path, clock: MemoryReactorClock) -> None:
    a, b = Hub(path, clock), Hub(path, clock)
    session = a.sessions.start(alice(a), "192.0.2.7")
    assert session.id is not None
    on_b = b.sessions.get(session.id)
    assert on_b is not None and on_b.key == session.key
    by_browse = b.sessions.by_browse(session.browse)
    assert by_browse is not None and by_browse.id is None and by_browse.csrf == session.csrf
    a.registry.close()
    restarted = Hub(path, clock)
    assert restarted.sessions.get(session.id) is not None
    b.sessions.end(on_b)  # sign-out on b ends it everywhere
    assert restarted.sessions.get(session.id) is None
    assert restarted.sessions.by_browse(session.browse) is None
    assert restarted.sessions.get("") is None and restarted.sessions.get("forged") is None


def test_idle_and_absolute_expiry(path: Path, clock: MemoryReactorClock) -> None:
    hub = Hub(path, clock)
    session = hub.sessions.start(alice(hub), "192.0.2.7")
    assert session.id is not None
    clock.advance(1801)
    assert hub.sessions.get(session.id) is None
    assert rows(hub, "web_sessions") == []  # found expired: deleted
    session = hub.sessions.start(alice(hub), "192.0.2.7")
    assert session.id is not None
    for _ in range(24):  # used every 29 minutes: idle never
        clock.advance(1740)
        assert hub.sessions.get(session.id) is not None
    clock.advance(43200 - 24 * 1740)  # 12 h after the sign-in
    assert hub.sessions.get(session.id) is None


def test_last_used_is_written_at_most_once_a_minute(path: Path,
                                                    clock: MemoryReactorClock) -> None:
    hub = Hub(path, clock)
    other = Hub(path, clock)
    session = hub.sessions.start(alice(hub), "192.0.2.7")
    assert session.id is not None
    start = clock.seconds()
    other.registry.changed()
    for _ in range(59):
        clock.advance(1)
        assert hub.sessions.get(session.id) is not None
    assert rows(hub, "web_sessions")[0][-2] == start  # used: not written
    assert not other.registry.changed()  # no commit in that minute
    clock.advance(1)
    assert hub.sessions.get(session.id) is not None
    assert rows(hub, "web_sessions")[0][-2] == start + 60
    # The idle timeout counts from the last write: at most a minute early, never late.
    clock.advance(59)
    assert hub.sessions.get(session.id) is not None  # no write (59 s after the last)
    clock.advance(1800 - 59 + 1)
    assert hub.sessions.get(session.id) is None


def test_a_link_is_spent_once_and_lives_60_seconds(path: Path,
                                                   clock: MemoryReactorClock) -> None:
    a, b = Hub(path, clock), Hub(path, clock)
    token = a.links.issue(alice(a), "hub.example").rsplit("/", 1)[1]
    assert b.links.valid(token) == alice(a)  # a preview spends nothing
    login = b.links.redeem(token)
    assert login is not None and login.user == "alice" and login.credential == b"alice-key"
    assert a.links.redeem(token) is None and b.links.redeem(token) is None
    assert b.links.valid(token) is None
    late = a.links.issue(alice(a), "hub.example").rsplit("/", 1)[1]
    clock.advance(60)
    assert b.links.valid(late) is None and b.links.redeem(late) is None
    assert rows(a, "web_links") == []  # an expired link is gone once tried
    assert a.links.redeem("") is None and a.links.valid("nope") is None


def test_two_hubs_spending_the_same_links_at_once_spend_each_once(
        path: Path, clock: MemoryReactorClock) -> None:
    issuer = Hub(path, clock)
    tokens = [issuer.links.issue(alice(issuer), "h").rsplit("/", 1)[1] for _ in range(40)]
    hubs = [Hub(path, clock) for _ in range(2)]
    won: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def spend(index: int) -> None:
        # A registry connection is used by one thread only: made in it.
        registry = Registry(str(path), now=clock.seconds)
        links = Now(WebLinks(InlineCalls(registry), clock, None, True, lambda: 443))
        start.wait(timeout=30)
        won[index] = [t for t in tokens if links.redeem(t) is not None]
        registry.close()

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not set(won[0]) & set(won[1])
    assert sorted(won[0] + won[1]) == sorted(tokens)
    assert hubs[0].links.redeem(tokens[0]) is None


def test_removing_the_user_or_changing_its_password_ends_its_sessions(
        path: Path, clock: MemoryReactorClock) -> None:
    a, b = Hub(path, clock), Hub(path, clock)
    login = alice(a)
    a.registry.add_user("bob", "$2b$04$bob", [], ["*"], "test")
    bob = b.sessions.start(OperatorLogin("bob", identity=a.registry.user("bob").identity,
                                         credential="$2b$04$bob"), "192.0.2.8")
    first = a.sessions.start(login, "192.0.2.7")
    a.links.issue(login, "h")
    # A change of grants or keys leaves the rows (a removed key lapses at the next
    # request, hub.access.operators.lapsed); a password change ends them all.
    a.registry.set_user("alice", "test", allow=["site-*"])
    assert len(b.registry.web_sessions_of("ALICE")) == 1
    a.registry.set_user("alice", "test", password_hash="$2b$04$new")
    assert b.registry.web_sessions_of("alice") == [] and rows(b, "web_links") == []
    assert first.id is not None and b.sessions.get(first.id) is None
    second = a.sessions.start(login, "192.0.2.7")
    a.links.issue(login, "h")
    a.registry.del_user("Alice", "test")
    assert second.id is not None and b.sessions.get(second.id) is None
    assert rows(b, "web_links") == []
    assert bob.id is not None and a.sessions.get(bob.id) is not None  # others stay


def test_pruning_is_bounded_and_keeps_live_rows(path: Path, clock: MemoryReactorClock) -> None:
    hub = Hub(path, clock)
    login = alice(hub)
    for _ in range(5):
        hub.sessions.start(login, "192.0.2.7")
        hub.links.issue(login, "h")
    clock.advance(1801)
    live = hub.sessions.start(login, "192.0.2.7")
    hub.links.issue(login, "h")
    assert hub.registry.web_prune(clock.seconds(), 1800, 2) == 4
    assert len(rows(hub, "web_sessions")) == 4 and len(rows(hub, "web_links")) == 4
    assert hub.sessions.prune() == 6
    assert live.id is not None and hub.sessions.get(live.id) is not None
    assert len(rows(hub, "web_links")) == 1


def test_beyond_the_cap_the_oldest_sessions_end(path: Path, clock: MemoryReactorClock) -> None:
    hub = Hub(path, clock)
    hub.sessions.max_sessions = 3
    made = []
    for _ in range(5):
        made.append(hub.sessions.start(alice(hub), "192.0.2.7"))
        clock.advance(1)
    assert [hub.sessions.get(s.id or "") is not None for s in made] == [False, False] + [True] * 3


def test_a_worker_gives_links_for_the_console_of_worker_0(tmp_path: Path,
                                                          clock: MemoryReactorClock) -> None:
    path = tmp_path / "hub.sqlite3"
    assert endpoint_port("ssl:8443:interface=127.0.0.1") == 8443
    assert endpoint_port("tcp:port=8080") == 8080
    assert endpoint_port("ssl:0:interface=127.0.0.1") is None
    assert endpoint_port("unix:/run/web.sock") is None

    class WorkerHub:
        def __init__(self, **options: str) -> None:
            self.config = build_config({"data": str(path.parent), **options})
            self.registry = Registry(str(path), now=clock.seconds)
            self.calls = InlineCalls(self.registry)
            self.clock = clock

    links = worker_weblinks(WorkerHub(web="ssl:8443"))  # type: ignore[arg-type]
    assert links is not None
    url = links.issue(alice(Hub(path, clock)), "192.0.2.1")
    assert url.startswith("https://192.0.2.1:8443/signin/")
    assert Hub(path, clock).links.redeem(url.rsplit("/", 1)[1]) is not None
    fixed = worker_weblinks(WorkerHub(web="ssl:0", **{"web-url": "https://hub.example.com"}))  # type: ignore[arg-type]
    assert fixed is not None and fixed.base("10.0.0.1") == "https://hub.example.com"
    assert worker_weblinks(WorkerHub(web="none")) is None  # type: ignore[arg-type]


def test_the_hub_prunes_at_start_and_every_five_minutes(tmp_path: Path) -> None:
    from hub.app.service import Options, makeService

    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    path = tmp_path / "hub.sqlite3"
    before = Hub(path, clock)
    before.sessions.start(alice(before), "192.0.2.7")
    clock.advance(1801)  # that session is expired when the hub starts
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:0:interface=127.0.0.1",
                          "--metrics", "none", "--web", "tcp:0:interface=127.0.0.1",
                          "--workers", "1"])
    top = makeService(options, reactor=clock)
    top.privilegedStartService()
    top.startService()
    try:
        assert rows(before, "web_sessions") == []
        before.links.issue(alice(before), "h")
        clock.advance(299)
        assert len(rows(before, "web_links")) == 1
        clock.advance(1)
        assert rows(before, "web_links") == []
    finally:
        top.stopService()
