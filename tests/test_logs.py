from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogLevel

from hub.app.logs import HubService, filtered_observer, parse_level, twistd_destination
from hub.errors import ConfigError


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
