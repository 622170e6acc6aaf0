"""`OpenNotice`: how a channel dialled into a device reports its open or refusal.
Its Deferred is made only when someone asks: a port's connection on the listener's
own forward has nobody waiting (no Deferred per connection, and no "Unhandled error
in Deferred" for a refusal nobody waited on)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from hub.ssh.connection import ChannelRefused
from hub.tunnel.dial import OpenNotice


class Channel(OpenNotice):
    pass


def outcome(d: Any) -> list[Any]:
    got: list[Any] = []
    d.addCallbacks(got.append, lambda f: got.append(f.value))
    return got


def test_asked_first_then_opened() -> None:
    channel = Channel()
    got = outcome(channel.opened)
    channel.notify_open()
    assert got == [channel]


def test_opened_before_anyone_asked() -> None:
    channel = Channel()
    channel.notify_open()
    assert channel._opened is None  # nobody asked: no Deferred made
    assert outcome(channel.opened) == [channel]


@pytest.mark.parametrize("asked_first", [True, False])
def test_refused_with_a_reason_in_words(asked_first: bool) -> None:
    channel = Channel()
    got = outcome(channel.opened) if asked_first else []
    channel.notify_failed("Connection refused")
    if not asked_first:
        got = outcome(channel.opened)
    assert isinstance(got[0], ChannelRefused) and got[0].text == "Connection refused"


def test_only_the_first_outcome_counts() -> None:
    channel = Channel()
    channel.notify_failed(ChannelRefused(2, "no"))
    channel.notify_open()
    assert isinstance(outcome(channel.opened)[0], ChannelRefused)


def test_a_refusal_nobody_waited_for_logs_no_unhandled_error() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        channel = Channel()
        channel.notify_failed("Connection refused")
        del channel
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "Unhandled error" in str(e.get("log_format", ""))]
