from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogLevel, PredicateResult, textFileLogObserver

from hub.app.logs import (
    HubService,
    RoutineChatter,
    SecondsText,
    filtered_observer,
    parse_level,
    twistd_destination,
)
from hub.errors import ConfigError
from hub.ssh.loglevel import GatedLogger


def test_parse_level() -> None:
    assert parse_level("DEBUG") is LogLevel.debug
    with pytest.raises(ConfigError, match="--log-level"):
        parse_level("loud")


def test_filtered_observer_drops_debug() -> None:
    out = io.StringIO()
    log = Logger(observer=filtered_observer(out, LogLevel.info))
    log.debug("chatter {n}", n=1)
    log.info("hello {who}", who="operator")
    assert "hello operator" in out.getvalue() and "chatter" not in out.getvalue()


def test_conch_channel_chatter_is_kept_out_unless_debugging() -> None:
    from twisted.conch.ssh.channel import SSHChannel

    def lines(level: LogLevel) -> str:
        out = io.StringIO()
        chan = SSHChannel()
        log = Logger(observer=filtered_observer(out, level), source=chan)
        log.info("opening channel {id}", id=0)
        log.warn("channel {id} misbehaved", id=0)
        Logger(observer=filtered_observer(out, level)).info("node {n} online", n="a")
        return out.getvalue()

    normal = lines(LogLevel.info)
    assert "opening channel" not in normal
    assert "channel 0 misbehaved" in normal and "node a online" in normal
    assert "opening channel 0" in lines(LogLevel.debug)


@pytest_twisted.ensureDeferred
async def test_port_and_transport_chatter_is_kept_out_unless_debugging() -> None:
    from twisted.conch.ssh.transport import SSHServerTransport
    from twisted.internet import protocol, reactor
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy

    async def lines(level: LogLevel) -> str:
        out = io.StringIO()
        observer = filtered_observer(out, level)
        globalLogPublisher.addObserver(observer)
        try:
            # A real port's own lines, as every device's forward makes them.
            port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
            await port.stopListening()
            legacy.msg("an old-style line of the hub's")
        finally:
            globalLogPublisher.removeObserver(observer)
        log = Logger(observer=observer, source=SSHServerTransport())
        log.info("connection lost")
        log.info("kex alg={alg}", alg="curve25519-sha256")
        return out.getvalue()

    normal = await lines(LogLevel.info)
    assert "starting on" not in normal and "Closed)" not in normal
    assert "connection lost" not in normal
    assert "an old-style line" in normal and "kex alg=curve25519" in normal
    debug = await lines(LogLevel.debug)
    assert "Factory starting on" in debug and "(TCP Port" in debug
    assert "connection lost" in debug


def test_destination_follows_twistd(tmp_path: Path) -> None:
    assert twistd_destination({"nodaemon": True, "logfile": None}) is sys.stdout
    assert twistd_destination({"logfile": "-"}) is sys.stdout
    assert twistd_destination({"logger": "x.y", "nodaemon": True}) is None
    assert twistd_destination({"syslog": True}) is None
    log_file = twistd_destination({"logfile": str(tmp_path / "hub.log")})
    assert log_file.path == str(tmp_path / "hub.log")  # type: ignore[union-attr]
    log_file.close()  # type: ignore[union-attr]


def test_hub_service_installs_the_observer_on_the_application() -> None:
    application = service.Application("callhomehub")
    HubService(LogLevel.warn, {"nodaemon": True}).setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is not None


def test_events_below_the_level_are_dropped_by_the_first_predicate() -> None:
    """A debug event goes no further than the first check (Conch logs several per
    login: in a reconnect storm, 4 % of a worker's time went to filtering them)."""
    chatter = RoutineChatter(LogLevel.info)
    assert chatter({"log_level": LogLevel.debug, "log_format": "x"}) is PredicateResult.no
    assert chatter({"log_level": LogLevel.info, "log_format": "x"}) is PredicateResult.maybe
    debugging = RoutineChatter(LogLevel.debug)
    assert debugging({"log_level": LogLevel.debug, "log_format": "x"}) is PredicateResult.maybe


def test_lines_are_those_of_twisteds_text_observer() -> None:
    """The time is worked out once a second; the lines stay what they were."""
    ours, twisteds = io.StringIO(), io.StringIO()
    observers = [filtered_observer(ours, LogLevel.info), textFileLogObserver(twisteds)]
    for when in (1_700_000_000.0, 1_700_000_000.9, 1_700_000_001.2, 1_700_003_600.5):
        event = {"log_format": "node {n}\nonline", "n": "a", "log_level": LogLevel.info,
                 "log_namespace": "hub.tunnel.sessions", "log_time": when}
        for observer in observers:
            observer(dict(event))
    assert ours.getvalue() == twisteds.getvalue()
    assert ours.getvalue().count("\n") == 8


def test_seconds_text_reuses_the_text_within_a_second() -> None:
    when = SecondsText()
    first = when(1_700_000_000.1)
    assert when(1_700_000_000.9) is first and when(1_700_000_001.0) is not first
    assert when(None) == "-"


@pytest.fixture
def gate() -> Iterator[type[GatedLogger]]:
    saved = GatedLogger.dropped
    yield GatedLogger
    GatedLogger.dropped = saved


def test_conchs_debug_events_are_not_built_below_the_level(
        gate: type[GatedLogger]) -> None:
    """The hub's Conch subclasses drop a debug event in `emit`, before the event is
    built and published (Conch logs several per login: 3-4 % of a worker's time in
    a reconnect storm); info and above go on, and nothing is dropped at debug."""
    from twisted.logger import globalLogPublisher

    from hub.access.server import HubServerTransport
    from hub.access.userauth import HubUserAuthServer
    from hub.ssh.connection import HubConnection

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_format", "").startswith("gate test"):
            seen.append(f"{event['log_level'].name} {event['log_namespace']}")

    sources = [HubServerTransport(), HubUserAuthServer(), HubConnection()]
    globalLogPublisher.addObserver(observer)
    try:
        application = service.Application("callhomehub")
        HubService(LogLevel.info, {"nodaemon": True}).setServiceParent(application)
        for source in sources:
            source._log.debug("gate test {n}", n=1)
            source._log.info("gate test {n}", n=2)
        assert seen == ["info hub.access.server.HubServerTransport",
                        "info hub.access.userauth.HubUserAuthServer",
                        "info hub.ssh.connection.HubConnection"]
        seen.clear()
        gate.drop_below(LogLevel.debug)
        sources[0]._log.debug("gate test {n}", n=3)
        assert seen == ["debug hub.access.server.HubServerTransport"]
    finally:
        globalLogPublisher.removeObserver(observer)
