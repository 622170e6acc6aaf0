from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.plugin import getPlugins

import hub
from hub.app.lifecycle import OpenFileLimit, raise_open_file_limit
from hub.app.service import Options, makeService


def test_twistd_finds_the_plugin() -> None:
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert makers["callhomehub"].module == "hub.app.service"
    assert makers["callhomehub"].options is Options


def test_make_service_listens_and_polls(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:2222:interface=127.0.0.1",
                          "--metrics", "none", "--web", "none", "--workers", "1"])
    reactor = MemoryReactorClock()
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    [(port, factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (2222, "127.0.0.1")
    assert factory.limits.login_timeout == 120
    assert (tmp_path / "hub.sqlite3").exists() and (tmp_path / "keys").is_dir()
    hub = top.hub  # type: ignore[attr-defined]
    other = type(hub.registry)(str(tmp_path / "hub.sqlite3"), now=reactor.seconds)
    other.register("site-a", b"k", "fp", "cli")
    reactor.advance(1.0)
    assert not hub.registry.changed()  # the poll already consumed the change
    top.stopService()


def test_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    set_to: list[tuple[int, int]] = []
    limits = raise_open_file_limit(lambda _: (1024, 65536),
                                   lambda _, value: set_to.append(value))
    assert set_to == [(65536, 65536)] and limits == (65536, 65536)


def test_open_file_limit_that_cannot_be_raised_is_kept_and_said() -> None:
    def refuse(_: int, value: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    with capture_events() as events:
        limits = raise_open_file_limit(lambda _: (1024, 4096), refuse)
        OpenFileLimit(lambda: (1024, 4096)).startService()
    assert limits == (1024, 4096)
    text = [formatEvent(e) for e in events]
    assert "cannot raise the open-file limit from 1024 to 4096: not allowed" in text
    assert any("open-file limit 1024: room for about 480 device tunnels (raise it" in t
               for t in text)
    assert events[-1]["log_level"] == LogLevel.warn


def test_a_generous_open_file_limit_is_only_reported() -> None:
    with capture_events() as events:
        OpenFileLimit(lambda: (20000, 20000)).startService()
    [event] = events
    assert formatEvent(event) == "open-file limit 20000: room for about 9968 device tunnels"
    assert event["log_level"] == LogLevel.info


@contextmanager
def capture_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_with_the_port_keeper_a_tunnel_costs_the_hub_one_descriptor() -> None:
    with capture_events() as events:
        OpenFileLimit(lambda: (20000, 20000), port_keeper=True).startService()
    assert formatEvent(events[0]) == "open-file limit 20000: room for about 19936 device tunnels"


def test_a_second_hub_on_the_same_data_directory_stops_before_touching_the_registry(
        tmp_path: Path) -> None:
    def make() -> Any:
        options = Options()
        options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:0:interface=127.0.0.1",
                              "--metrics", "none", "--web", "none", "--workers", "1"])
        return makeService(options, reactor=MemoryReactorClock())

    first = make()
    first.privilegedStartService()
    first.startService()
    registry = first.hub.registry
    registry.register("site-a", b"k", "fp", "cli")
    registry.mark_online("site-a", "192.0.2.1")
    with pytest.raises(SystemExit) as stopped:
        make()
    assert str(stopped.value) == (
        f"callhomehub: --data {tmp_path}: another hub is running on this data directory "
        f"(pid {os.getpid()}); stop it first")
    assert registry.node("site-a").online  # the second hub reset nothing
    first.stopService()
    second = make()  # the lock went with the first hub
    assert not second.hub.registry.node("site-a").online
    second.privilegedStartService()
    second.startService()
    second.stopService()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        Options().parseOptions(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"callhomehub {hub.__version__}\n"


def test_start_says_where_the_state_is_and_warns_without_a_call_home_password(
        tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:0:interface=127.0.0.1",
                          "--metrics", "none", "--web", "none", "--workers", "1"])
    top = makeService(options, reactor=MemoryReactorClock())
    top.hub.registry.register("site-a", b"k", "fp", "cli")  # type: ignore[attr-defined]
    with capture_events() as events:
        top.privilegedStartService()
        top.startService()
    top.stopService()
    text = [formatEvent(e) for e in events]
    assert (f"data directory {tmp_path}: 1 nodes (0 approved), 0 operators, Call Home Password "
            "not set") in text
    [warning] = [e for e in events if e["log_level"] == LogLevel.warn
                 and "Call Home Password" in formatEvent(e)]
    assert formatEvent(warning) == (
        "no Call Home Password is set: new devices cannot register; set one with "
        f"callhomehub --data {tmp_path} callhome-password")
