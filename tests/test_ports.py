"""Which port and service a forward gets: the pure rules and the registry's leases."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.errors import NotFound, PortsExhausted
from hub.rules.ports import BusyPorts, choose_port, free_ports, is_label, lease_port, service_name
from hub.store.registry import Registry

LOW, HIGH = 50000, 50009


# -- service_name ----------------------------------------------------------

@pytest.mark.parametrize(("bind", "port", "service"), [
    # A label names the service, whatever the port.
    ("http", 0, "http"),
    ("http", 8080, "http"),
    ("app", 0, "app"),
    ("Web", 0, "web"),
    ("my-app_2", 443, "my-app_2"),
    ("a" * 32, 0, "a" * 32),
    # Addresses, localhost, `*` and empty are not labels: the port decides.
    ("", 0, "ssh"),
    ("", 22, "ssh"),
    ("", 80, "http"),
    ("", 443, "https"),
    ("", 8080, "port-8080"),
    ("", 1, "port-1"),
    ("", 65535, "port-65535"),
    ("localhost", 0, "ssh"),
    ("LOCALHOST", 80, "http"),
    ("localhost", 2222, "port-2222"),
    ("*", 0, "ssh"),
    ("*", 443, "https"),
    ("127.0.0.1", 0, "ssh"),
    ("127.0.0.1", 22, "ssh"),
    ("0.0.0.0", 80, "http"),
    ("192.0.2.7", 5000, "port-5000"),
    ("::", 0, "ssh"),
    ("::1", 443, "https"),
    ("fe80::1", 8443, "port-8443"),
])
def test_service_name(bind: str, port: int, service: str) -> None:
    assert service_name(bind, port) == service


@pytest.mark.parametrize("bind", [
    "", "*", "localhost", "Localhost", "127.0.0.1", "::", "::1", "0.0.0.0",
    "1http",            # must start with a letter
    "a" * 33,           # too long
    "has space", "dot.ted", "x:y", "é",
])
def test_not_a_label(bind: str) -> None:
    assert not is_label(bind)


@pytest.mark.parametrize("bind", ["http", "https", "ssh", "a", "web-1", "a_b", "HTTP"])
def test_label(bind: str) -> None:
    assert is_label(bind)


# -- choose_port -----------------------------------------------------------

def test_choose_port_lowest_free() -> None:
    assert choose_port(set(), LOW, HIGH) == LOW
    assert choose_port({LOW, LOW + 1}, LOW, HIGH) == LOW + 2
    assert choose_port({LOW + 1}, LOW, HIGH) == LOW
    # Leases outside the range do not matter.
    assert choose_port({LOW - 1, HIGH + 1}, LOW, HIGH) == LOW


def test_choose_port_avoid() -> None:
    assert choose_port(set(), LOW, HIGH, avoid={LOW}) == LOW + 1
    assert choose_port({LOW + 1}, LOW, HIGH, avoid=[LOW, LOW + 2]) == LOW + 3


def test_choose_port_exhausted() -> None:
    full = set(range(LOW, HIGH + 1))
    assert choose_port(full, LOW, HIGH) is None
    assert choose_port(full - {HIGH}, LOW, HIGH) == HIGH
    assert choose_port(full - {HIGH}, LOW, HIGH, avoid={HIGH}) is None
    assert choose_port(set(), LOW, LOW) == LOW
    assert choose_port(set(), LOW, LOW, avoid={LOW}) is None


# -- lease_port: the one rule ----------------------------------------------

def test_lease_port_is_sticky() -> None:
    # The previous lease wins over a lower free port.
    assert lease_port(LOW, HIGH, [LOW, LOW + 5], previous=LOW + 3) == LOW + 3
    # Unless it is avoided or outside the range: then the lowest usable free port.
    assert lease_port(LOW, HIGH, [LOW, LOW + 5], {LOW + 3}, LOW + 3) == LOW
    assert lease_port(LOW, HIGH, [LOW, LOW + 5], {LOW}, LOW + 3) == LOW + 3
    assert lease_port(LOW, HIGH, [LOW, LOW + 5], {LOW}, LOW - 1) == LOW + 5
    assert lease_port(LOW, HIGH, [LOW, LOW + 5], {LOW}, HIGH + 1) == LOW + 5


def test_lease_port_exhausted() -> None:
    assert lease_port(LOW, HIGH, []) is None
    assert lease_port(LOW, HIGH, [LOW + 2], avoid={LOW + 2}) is None
    # A full range still hands a node its own lease.
    assert lease_port(LOW, HIGH, [], previous=HIGH) == HIGH
    assert lease_port(LOW, HIGH, [], {HIGH}, HIGH) is None


def test_lease_port_ignores_free_ports_outside_the_range() -> None:
    assert lease_port(LOW, HIGH, [LOW - 3, HIGH + 1]) is None
    assert lease_port(LOW, HIGH, [LOW - 3, LOW + 7]) == LOW + 7


def test_lease_port_reads_free_ports_only_as_far_as_needed() -> None:
    def unread() -> Iterator[int]:
        raise AssertionError("the free ports were read although the lease was usable")
        yield LOW

    assert lease_port(LOW, HIGH, unread(), previous=LOW + 4) == LOW + 4
    # An endless supply is fine: the first usable port ends the search.
    assert lease_port(LOW, HIGH, itertools.count(LOW), {LOW, LOW + 1}) == LOW + 2


@given(low=st.integers(1, 100), width=st.integers(0, 30),
       leased=st.frozensets(st.integers(0, 140)), avoid=st.frozensets(st.integers(0, 140)),
       previous=st.none() | st.integers(0, 140))
def test_lease_port_rule(low: int, width: int, leased: frozenset[int], avoid: frozenset[int],
                         previous: int | None) -> None:
    high = low + width
    others = leased - {previous}  # the node's own lease is not someone else's port
    port = lease_port(low, high, free_ports(leased | {previous} - {None}, low, high),
                      avoid, previous)
    usable = [p for p in range(low, high + 1) if p not in others and p not in avoid]
    if previous is not None and previous in usable:
        assert port == previous
    elif port is None:
        assert not usable
    else:
        # Within the range, never another's port nor an avoided one: the lowest such.
        assert low <= port <= high and port not in others and port not in avoid
        assert port == min(usable)


def test_free_ports() -> None:
    assert list(free_ports({LOW + 1, LOW + 3, HIGH + 1}, LOW, LOW + 4)) == [LOW, LOW + 2, LOW + 4]
    assert list(free_ports(set(), LOW, LOW)) == [LOW]
    assert list(free_ports({LOW}, LOW, LOW)) == []


# -- Registry.lease --------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def db(registry_at: str) -> str:
    """The registry on each engine (SQLite file, PostgreSQL database)."""
    return registry_at


@pytest.fixture
def registry(db: str) -> Registry:
    registry = Registry(str(db), now=Clock())
    for i, name in enumerate(("site-a", "site-b", "site-c")):
        registry.register(name, f"key-{i}".encode(), f"SHA256:{i}", "test")
    return registry


def test_lease_is_sticky(registry: Registry) -> None:
    assert registry.lease("site-a", "ssh", LOW, HIGH) == (LOW, True)
    assert registry.lease("site-a", "http", LOW, HIGH) == (LOW + 1, True)
    assert registry.lease("site-a", "ssh", LOW, HIGH) == (LOW, False)
    assert registry.lease("site-a", "http", LOW, HIGH) == (LOW + 1, False)
    # Node names are case-insensitive.
    assert registry.lease("SITE-A", "ssh", LOW, HIGH) == (LOW, False)
    assert registry.node("site-a").forwards == {"ssh": LOW, "http": LOW + 1}
    leases = [e for e in registry.audit_log() if e.action == "lease"]
    assert [e.detail for e in leases] == [f"ssh={LOW}", f"http={LOW + 1}"]


def test_nodes_never_share_a_port(registry: Registry) -> None:
    got = {}
    for node in ("site-a", "site-b", "site-c"):
        for service in ("ssh", "http", "port-8080"):
            got[node, service] = registry.lease(node, service, LOW, HIGH)[0]
    assert len(set(got.values())) == len(got) == 9
    assert all(LOW <= p <= HIGH for p in got.values())
    # Asked again, in another order, everybody keeps their port.
    for (node, service), port in reversed(got.items()):
        assert registry.lease(node, service, LOW, HIGH) == (port, False)


def test_lease_outside_a_new_range_is_released_and_leased_again(registry: Registry) -> None:
    old, _ = registry.lease("site-a", "ssh", LOW, HIGH)
    other, _ = registry.lease("site-b", "ssh", LOW + 100, LOW + 109)
    assert registry.lease("site-a", "ssh", LOW + 100, LOW + 109) == (other + 1, True)
    assert registry.node("site-a").forwards == {"ssh": other + 1}
    # The old port is free again.
    assert registry.lease("site-c", "ssh", LOW, HIGH) == (old, True)


def test_lease_avoid(registry: Registry) -> None:
    first, _ = registry.lease("site-a", "ssh", LOW, HIGH)
    # A port another program holds is given up for the next free one.
    second, new = registry.lease("site-a", "ssh", LOW, HIGH, avoid={first})
    assert (second, new) == (LOW + 1, True)
    assert registry.node("site-a").forwards == {"ssh": second}
    # The given-up port is free again, except to whoever avoids it.
    assert registry.lease("site-b", "ssh", LOW, HIGH, avoid={first}) == (LOW + 2, True)
    assert registry.lease("site-c", "ssh", LOW, HIGH) == (first, True)


def test_lease_exhaustion(registry: Registry) -> None:
    assert registry.lease("site-a", "ssh", LOW, LOW + 1)[0] == LOW
    assert registry.lease("site-b", "ssh", LOW, LOW + 1)[0] == LOW + 1
    with pytest.raises(PortsExhausted, match=f"no free port left in {LOW}-{LOW + 1}"):
        registry.lease("site-c", "ssh", LOW, LOW + 1)
    with pytest.raises(PortsExhausted):
        registry.lease("site-a", "http", LOW, LOW + 1)
    # Nothing half-done: the refused leases left no trace.
    assert registry.node("site-c").forwards == {}
    assert registry.node("site-a").forwards == {"ssh": LOW}
    # An existing lease is still handed out in a full range.
    assert registry.lease("site-a", "ssh", LOW, LOW + 1) == (LOW, False)


def test_exhaustion_through_avoid_keeps_nothing(registry: Registry) -> None:
    registry.lease("site-a", "ssh", LOW, LOW)
    with pytest.raises(PortsExhausted):
        registry.lease("site-a", "ssh", LOW, LOW, avoid={LOW})
    # The transaction rolled back: the old lease is still there.
    assert registry.node("site-a").forwards == {"ssh": LOW}


def test_busy_ports_are_passed_over_by_new_leases_only(registry: Registry) -> None:
    assert registry.lease("site-a", "ssh", LOW, HIGH, busy={LOW, LOW + 1}) == (LOW + 2, True)
    # A node's own port is kept even when found busy lately: the program may have let it go.
    assert registry.lease("site-a", "ssh", LOW, HIGH, busy={LOW + 2}) == (LOW + 2, False)
    # With only busy ports left, one of them is taken rather than refusing the forward.
    assert registry.lease("site-b", "ssh", LOW, LOW + 2, busy={LOW, LOW + 1}) == (LOW, True)
    with pytest.raises(PortsExhausted):
        registry.lease("site-c", "ssh", LOW, LOW + 2, avoid={LOW + 1}, busy={LOW + 1})


def test_lease_port_passes_over_busy_ports_but_keeps_the_previous_one() -> None:
    assert lease_port(LOW, HIGH, free_ports(set(), LOW, HIGH), busy={LOW}) == LOW + 1
    assert lease_port(LOW, HIGH, free_ports(set(), LOW, HIGH), previous=LOW, busy={LOW}) == LOW
    assert lease_port(LOW, LOW, free_ports(set(), LOW, LOW), busy={LOW}) is None


def test_busy_ports_are_remembered_for_a_while() -> None:
    busy = BusyPorts(held_for=300)
    assert busy.found(LOW, now=1000) is True
    assert busy.found(LOW, now=1100) is False  # known: not worth another log line
    assert busy.found(LOW + 1, now=1200) is True
    assert busy.recent(1399) == {LOW, LOW + 1}
    assert busy.recent(1400) == {LOW + 1}  # 300 s after it was last found
    assert busy.recent(1500) == set()
    assert busy.found(LOW, now=1500) is True


def test_lease_for_unknown_node(registry: Registry) -> None:
    with pytest.raises(NotFound):
        registry.lease("nobody", "ssh", LOW, HIGH)


def test_leases_survive_reopening(registry: Registry, db: str) -> None:
    a = registry.lease("site-a", "ssh", LOW, HIGH)[0]
    b = registry.lease("site-b", "http", LOW, HIGH)[0]
    registry.set_lease_active("site-a", "ssh", True)
    registry.close()
    again = Registry(str(db), now=Clock())
    assert again.lease("site-a", "ssh", LOW, HIGH) == (a, False)
    assert again.lease("site-b", "http", LOW, HIGH) == (b, False)
    assert again.lease("site-c", "ssh", LOW, HIGH) == (LOW + 2, True)
    # A hub start marks every lease inactive but keeps it.
    again.reset_online()
    assert again.node("site-a").forwards == {"ssh": a}


def test_leases_seen_by_a_second_registry_object(registry: Registry, db: str) -> None:
    cli = Registry(str(db), now=Clock())
    port = cli.lease("site-a", "ssh", LOW, HIGH)[0]
    assert registry.lease("site-a", "ssh", LOW, HIGH) == (port, False)
    assert registry.lease("site-b", "ssh", LOW, HIGH) == (port + 1, True)


def test_removing_a_node_frees_its_ports(registry: Registry) -> None:
    port = registry.lease("site-a", "ssh", LOW, HIGH)[0]
    registry.remove("site-a", "test")
    assert registry.lease("site-b", "ssh", LOW, HIGH) == (port, True)


def test_registry_leases_follow_the_rule(registry: Registry) -> None:
    """Random leases, moves and removals: the registry's answer (free ports from
    its index) is always the rule's answer over a model of the leases."""
    rng = random.Random(12)
    nodes = [f"n{i}" for i in range(12)]
    for i, name in enumerate(nodes):
        registry.register(name, f"rk-{i}".encode(), "fp", "test")
    model: dict[tuple[str, str], int] = {}
    for _ in range(400):
        node, service = rng.choice(nodes), rng.choice(("ssh", "http", "port-8080"))
        if rng.random() < 0.1:
            registry.remove(node, "test")
            registry.register(node, f"rk-{node}-{rng.random()}".encode(), "fp", "test")
            model = {k: v for k, v in model.items() if k[0] != node}
            continue
        low = rng.choice((LOW, LOW + 6))
        high = low + rng.randrange(4, 16)
        avoid = set(rng.sample(range(LOW - 2, LOW + 24), rng.randrange(0, 4)))
        previous = model.get((node, service))
        leased = set(model.values())
        expected = lease_port(low, high, free_ports(leased, low, high), avoid, previous)
        if expected is None:
            with pytest.raises(PortsExhausted):
                registry.lease(node, service, low, high, avoid)
        else:
            assert registry.lease(node, service, low, high, avoid) == (
                expected, expected != previous)
            model[node, service] = expected
        assert {(n.name, s): p for n in registry.nodes() for s, p in n.forwards.items()} == model
