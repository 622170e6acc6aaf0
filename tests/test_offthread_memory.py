"""The in-memory hub with its registry calls in a real registry thread: what waits
for the registry keeps its order, and a device gone meanwhile is not taken over."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from memory_hub import make_hub, registry_thread, settle, start_factory
from test_tunnels_memory import HIGH, LOW, Device, RecordingReactor, allocated, register
from twisted.logger import LogEvent, formatEvent

from hub.app.context import Hub
from hub.store.offthread import RegistryThread
from hub.store.registry import Registry


def threaded(tmp_path: Path, reactor: RecordingReactor) -> tuple[Hub, RegistryThread]:
    hub = make_hub(tmp_path, reactor, keepalive="0", **{"port-range": f"{LOW}-{HIGH}"})
    thread = registry_thread(tmp_path, reactor)
    hub.calls = hub.sessions.calls = thread
    return hub, thread


def pump(device: Device, thread: RegistryThread) -> None:
    """Carry packets and registry answers until neither moves."""
    for _ in range(50):
        moved = device.pump.pump()
        settle(thread)
        if not moved and not device.pump.pump():
            return
    raise AssertionError("the connection never settled")


def test_forward_requests_made_during_the_takeover_are_answered_in_order(
        tmp_path: Path) -> None:
    reactor = RecordingReactor()
    hub, thread = threaded(tmp_path, reactor)
    key = register(hub, "site-a")
    hub.registry.set_state("site-a", "approved", "test")
    device = Device(start_factory(hub), reactor, key=key)
    pump(device, thread)
    assert device.connected
    # Three requests at once: the first starts the takeover (the node's record is
    # read in the registry thread), the others wait behind it.
    answers = [device.request(b"tcpip-forward", bind, 0) for bind in (b"", b"http", b"app")]
    device.pump.pump()
    assert answers == [[], [], []]  # nothing answered before the registry did
    pump(device, thread)
    ports = [allocated(a[0]) for a in answers]
    assert ports == sorted(ports) and len(set(ports)) == 3  # leased in request order
    node = hub.registry.node("site-a")
    assert node.online and node.live == {"ssh", "http", "app"}
    assert [e.detail for e in hub.registry.audit_log() if e.action == "lease"] == [
        f"ssh={ports[0]}", f"http={ports[1]}", f"app={ports[2]}"]


def test_a_device_gone_during_its_takeover_is_not_taken_over(tmp_path: Path) -> None:
    reactor = RecordingReactor()
    hub, thread = threaded(tmp_path, reactor)
    key = register(hub, "site-a")
    hub.registry.set_state("site-a", "approved", "test")
    device = Device(start_factory(hub), reactor, key=key)
    pump(device, thread)
    answers = device.request(b"tcpip-forward", b"", 0)
    device.pump.pump()  # the request reached the hub; the takeover waits for the registry
    device.hang_up()
    pump(device, thread)
    assert answers in ([], [("fail",)])
    assert hub.sessions.get("site-a") is None and reactor.listening() == {}
    node = hub.registry.node("site-a")
    assert not node.online and not node.live


class LockedRegistry(Registry):
    """An engine whose lease fails as a database locked by another writer."""

    def lease(self, *args: Any, **kwargs: Any) -> tuple[int, bool]:
        raise sqlite3.OperationalError("database is locked")


def test_a_database_error_on_a_forward_refuses_it_in_words(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    reactor = RecordingReactor()
    hub = make_hub(tmp_path, reactor, keepalive="0", **{"port-range": f"{LOW}-{HIGH}"})
    thread = RegistryThread(
        lambda: LockedRegistry(str(tmp_path / "hub.sqlite3"), now=reactor.seconds), None,
        reactor)
    hub.calls = hub.sessions.calls = thread
    key = register(hub, "site-a")
    device = Device(start_factory(hub), reactor, key=key)
    pump(device, thread)
    answers = device.request(b"tcpip-forward", b"", 0)
    pump(device, thread)
    assert answers == [("fail",)] and reactor.listening() == {}
    lines = [formatEvent(e) for e in logged]
    assert ("node site-a: forward ssh refused: the registry failed: database is locked"
            in lines)
    assert not any(e.get("log_failure") for e in logged)  # no traceback
