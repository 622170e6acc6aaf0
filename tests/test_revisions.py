"""Reading only the nodes changed since the last read (hub.store.revisions), on both engines.

Every write another process or hub makes is followed by the mirror's read, and the
mirror must then equal a whole read of the list; the rows it read must be only those
the write changed.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count

import pytest

from hub.errors import NotFound
from hub.store.registry import Node, Registry
from hub.store.revisions import KEPT_READS, MirrorCursor, NodeMirror

LOW, HIGH = 50000, 50099


def by_name(nodes: list[Node]) -> dict[str, Node]:
    return {n.name.lower(): n for n in nodes}


@pytest.fixture
def hubs(registry_at: str) -> tuple[Registry, Registry]:
    """Hub A (which keeps the mirror) and hub B (another hub, or the CLI), one registry."""
    clock = count(1000)
    a = Registry(registry_at, now=lambda: float(next(clock)))
    b = Registry(registry_at, now=lambda: float(next(clock)))
    a.hub_id, b.hub_id = "hub-a", "hub-b"
    yield a, b
    a.close()
    b.close()


def seed(reg: Registry, n: int) -> None:
    for i in range(n):
        reg.register(f"site-{i}", f"key-{i}".encode(), "fp", "test")
        reg.set_state(f"site-{i}", "approved", "test")
        reg.lease(f"site-{i}", "ssh", LOW, HIGH)


def test_a_change_reads_only_the_nodes_it_changed(hubs: tuple[Registry, Registry]) -> None:
    a, b = hubs
    seed(b, 20)
    mirror = NodeMirror()
    assert len(mirror.nodes(a)) == 20 and mirror.full_reads == 1
    # Nothing changed: nothing read.
    since = a.node_changes(None).generation
    assert a.node_changes(since).nodes == []
    b.set_public("site-3", True, "test")
    changes = a.node_changes(since)
    assert [n.name for n in changes.nodes] == ["site-3"] and changes.nodes[0].public
    # A lease change stamps its node, not others.
    since = changes.generation
    b.mark_online("site-7", "192.0.2.7")
    b.set_lease_active("site-7", "ssh", True)
    changes = a.node_changes(since)
    assert [(n.name, n.online, n.live) for n in changes.nodes] == [
        ("site-7", True, frozenset({"ssh"}))]
    # Writes no hub acts on (last seen, heartbeats) stamp nothing.
    since = changes.generation
    b.touch("site-9")
    assert a.node_changes(since).nodes == []


WRITES: list[tuple[str, Callable[[Registry, Registry], object]]] = [
    ("register", lambda a, b: b.register("new-1", b"key-new", "fp", "test")),
    ("approve", lambda a, b: b.set_state("new-1", "approved", "test")),
    ("lease", lambda a, b: b.lease("new-1", "ssh", LOW, HIGH)),
    ("online on B", lambda a, b: b.mark_online("new-1", "192.0.2.1")),
    ("lease active", lambda a, b: b.set_lease_active("new-1", "ssh", True)),
    ("access on", lambda a, b: b.set_public("site-1", True, "test")),
    ("device access", lambda a, b: b.set_device_access("site-2", "test", device_user="admin")),
    ("revoke", lambda a, b: b.set_state("site-4", "revoked", "test")),
    ("online on A", lambda a, b: a.mark_online("site-5", "192.0.2.5")),
    ("taken over by B", lambda a, b: b.mark_online("site-5", "192.0.2.6")),
    ("offline", lambda a, b: b.mark_offline("site-5", "new-1")),
    ("online again on B", lambda a, b: b.mark_online("new-1", "192.0.2.1")),
    ("B dies, A reclaims", lambda a, b: a.reclaim_hub("hub-b", "hub-a")),
    ("remove", lambda a, b: b.remove("site-6", "test")),
    ("remove and add", lambda a, b: (b.remove("site-7", "test"),
                                     b.register("site-7", b"other", "fp", "test"))),
    ("pending leases expire", lambda a, b: (
        b.register("gone", b"key-gone", "fp", "test"), b.lease("gone", "ssh", LOW, HIGH),
        b.expire_pending_leases(10**9))),
    ("B restarts", lambda a, b: (b.mark_online("site-8", "192.0.2.8"),
                                 b.set_lease_active("site-8", "ssh", True), b.reset_online())),
    ("a pair", lambda a, b: b.add_pair("pair-1", "site-1", "site-2", "test")),
]


def test_the_mirror_equals_a_whole_read_after_every_kind_of_write(
        hubs: tuple[Registry, Registry]) -> None:
    a, b = hubs
    seed(b, 10)
    mirror = NodeMirror()
    mirror.nodes(a)
    for what, write in WRITES:
        write(a, b)
        assert by_name(mirror.nodes(a)) == by_name(a.nodes()), what
    # Only the removals made it read the whole list again (the first read, 2 removals).
    assert (mirror.full_reads, mirror.change_reads) == (3, len(WRITES) - 2)


def test_a_removed_node_leaves_the_mirror(hubs: tuple[Registry, Registry]) -> None:
    a, b = hubs
    seed(b, 3)
    mirror = NodeMirror()
    mirror.nodes(a)
    b.remove("site-1", "test")
    assert sorted(by_name(mirror.nodes(a))) == ["site-0", "site-2"]
    with pytest.raises(NotFound):
        a.node("site-1")


def test_each_reader_gets_the_changes_since_its_own_last_update(
        hubs: tuple[Registry, Registry]) -> None:
    """`Hub.apply` and the fleet view share one mirror: a change one of them read
    in must still reach the other, which looks only at the nodes changed."""
    a, b = hubs
    seed(b, 5)
    mirror = NodeMirror()
    applied, fleet = MirrorCursor(), MirrorCursor()
    first = mirror.update(a, applied)
    assert first.whole and sorted(first.nodes) == [f"site-{i}" for i in range(5)]
    assert mirror.update(a, fleet).whole  # its first update too
    b.set_public("site-1", True, "test")
    seen = mirror.update(a, fleet)
    assert not seen.whole and [n.name for n in seen.changed] == ["site-1"]
    b.set_state("site-3", "revoked", "test")
    got = mirror.update(a, applied)
    assert not got.whole and sorted(n.name for n in got.changed) == ["site-1", "site-3"]
    assert got.nodes == by_name(a.nodes())
    assert mirror.update(a, applied).changed == []
    assert [n.name for n in mirror.update(a, fleet).changed] == ["site-3"]


def test_a_removal_or_a_reader_far_behind_gets_the_whole_list(
        hubs: tuple[Registry, Registry]) -> None:
    a, b = hubs
    seed(b, 3)
    mirror = NodeMirror()
    behind, current = MirrorCursor(), MirrorCursor()
    mirror.update(a, behind)
    mirror.update(a, current)
    for i in range(KEPT_READS):
        b.set_public("site-0", i % 2 == 0, "test")
        assert not mirror.update(a, current).whole
    # The reads `behind` missed are no longer all kept: it compares everything.
    late = mirror.update(a, behind)
    assert late.whole and late.nodes == by_name(a.nodes())
    b.remove("site-2", "test")
    got = mirror.update(a, current)
    assert got.whole and sorted(got.nodes) == ["site-0", "site-1"]
