"""The fleet as a hub last read it: reads in the registry thread never stack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from hub.cluster.view import FleetView
from hub.store.hubs import HubRow
from hub.store.registry import Node
from hub.store.revisions import NodeUpdate


class HeldCalls:
    """Registry calls that answer when the test says (a slow registry thread)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[..., Any], defer.Deferred[Any]]] = []

    def call(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((fn, done))
        return done

    def answer(self, result: Any) -> None:
        fn, done = self.pending.pop(0)
        assert getattr(fn, "__func__", None) is FleetView.read
        done.callback(result)


def node(name: str, hub: str | None, online: bool = True) -> Node:
    return Node(1, name, "device", None, "fp", "approved", 0.0, None, "", online, None, False,
                "", None, {}, hub=hub)


def test_changes_during_a_read_make_one_more_read_and_the_view_answers_from_memory() -> None:
    calls = HeldCalls()
    view = FleetView(calls)  # type: ignore[arg-type]
    told: list[int] = []
    view.on_refresh.append(lambda: told.append(len(view.nodes())))
    first = view.refresh()
    second, third = view.refresh(), view.refresh()  # changes while the first read runs
    assert len(calls.pending) == 1 and second is first and third is first
    hubs = [HubRow("hub-a", "127.0.0.1:1", "k", 0.0, 10.0)]
    calls.answer((hubs, NodeUpdate.of([node("Site-A", "hub-a")])))
    # One more read for the changes meanwhile (not two), and the Deferred waits for it.
    assert len(calls.pending) == 1 and not first.called
    calls.answer((hubs, NodeUpdate.of([node("Site-A", "hub-a"),
                                        node("site-b", "hub-a", online=False)])))
    assert first.called and calls.pending == [] and told == [1, 2]
    assert view.holder("site-a") == "hub-a" and view.holder("site-b") is None
    assert view.hub("hub-a") == hubs[0] and view.node("nowhere") is None


def test_a_failed_read_keeps_the_last_view() -> None:
    calls = HeldCalls()
    view = FleetView(calls)  # type: ignore[arg-type]
    view.refresh()
    calls.answer(([], NodeUpdate.of([node("site-a", "hub-a")])))
    done = view.refresh()
    calls.pending.pop(0)[1].errback(RuntimeError("database gone"))
    assert done.called and view.holder("site-a") == "hub-a"
