"""The hub's log observer under twistd: twistd's own destination, with a level filter.

Conch logs at debug level for every window adjust and global request; written
out, that costs throughput and drowns what matters. twistd asks the
application for an `ILogObserver` component before building its own, so the
top service installs one when twistd attaches it: the same destination twistd
would use (`--logfile`, stdout with `-n`, else `twistd.log`), filtered at
`--log-level` (default info).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    textFileLogObserver,
)
from twisted.python import logfile
from zope.interface import implementer

from hub.errors import ConfigError

LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def parse_level(name: str) -> LogLevel:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ConfigError(f"--log-level: {name!r} is not one of "
                          f"{', '.join(LEVELS)}") from None


@implementer(ILogFilterPredicate)
class ChannelChatter:
    """Below warn, Conch's own per-channel lines ("opening channel 0 with ...",
    "channel open", "remote close", "sending close 0") are kept out unless the
    level is debug: three lines for every forwarded connection, a third of the
    hub's time for short requests through a tunnel."""

    def __init__(self, level: LogLevel) -> None:
        self.level = level

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if (self.level > LogLevel.debug
                and isinstance(event.get("log_source"), (SSHChannel, SSHConnection))
                and event.get("log_level", LogLevel.info) < LogLevel.warn):
            return PredicateResult.no
        return PredicateResult.maybe


def filtered_observer(destination: Any, level: LogLevel) -> ILogObserver:
    return FilteringLogObserver(textFileLogObserver(destination),
                                [ChannelChatter(level),
                                 LogLevelFilterPredicate(defaultLogLevel=level)])


def twistd_destination(server_options: Any) -> Any:
    """Where twistd itself would log, from its own options (None: leave it to twistd)."""
    if server_options is None or server_options.get("logger") or server_options.get("syslog"):
        return None
    name = server_options.get("logfile")
    if name == "-" or (not name and server_options.get("nodaemon")):
        return sys.stdout
    return logfile.LogFile.fromFullPath(name or "twistd.log")


class HubService(service.MultiService):
    """The top service; installs the filtered observer on twistd's application."""

    def __init__(self, level: LogLevel, server_options: Any) -> None:
        service.MultiService.__init__(self)
        self.level = level
        self.server_options = server_options

    def setServiceParent(self, parent: Any) -> Any:
        result = service.MultiService.setServiceParent(self, parent)
        destination = twistd_destination(self.server_options)
        if destination is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, filtered_observer(destination, self.level))
        return result
