"""The hub's log observer under twistd: twistd's own destination, with a level filter.

Conch logs at debug level for every window adjust and global request; written
out, that costs throughput and drowns what matters. twistd asks the
application for an `ILogObserver` component before building its own, so the
top service installs one when twistd attaches it: the same destination twistd
would use (`--logfile`, stdout with `-n`, else `twistd.log`), filtered at
`--log-level` (default info).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from twisted.application import service
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.transport import SSHTransportBase
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python import logfile
from zope.interface import implementer

from hub.errors import ConfigError
from hub.ssh.loglevel import GatedLogger

LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def parse_level(name: str) -> LogLevel:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ConfigError(f"--log-level: {name!r} is not one of "
                          f"{', '.join(LEVELS)}") from None


# Twisted's own line for every port opened and closed; the hub says which node's
# forward a port is ("node X: forward ssh on ...") and when it goes.
_PORT_CHATTER = re.compile(r"\w+ starting on \d+|\(\w+ Port \d+ Closed\)")


@implementer(ILogFilterPredicate)
class RoutineChatter:
    """Below warn, Twisted's and Conch's routine lines are kept out unless the
    level is debug: Conch's per-channel lines ("opening channel 0 with ...",
    "channel open", "remote close", "sending close 0": three for every forwarded
    connection, a third of the hub's time for short requests through a tunnel),
    the transport's bare "connection lost", and a listening port's "X starting on
    N" and "(TCP Port N Closed)" (two for every device's forward: in a reconnect
    storm of thousands of devices, lines that say less than the hub's own)."""

    def __init__(self, level: LogLevel) -> None:
        self.level = level

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        level = event.get("log_level", LogLevel.info)
        if level < self.level:
            # What the level filter after this one drops, dropped first: Conch's
            # debug lines came to 4 % of a worker's time in a reconnect storm.
            return PredicateResult.no
        if self.level <= LogLevel.debug or level >= LogLevel.warn:
            return PredicateResult.maybe
        source = event.get("log_source")
        if isinstance(source, (SSHChannel, SSHConnection)):
            return PredicateResult.no
        if isinstance(source, SSHTransportBase) and event.get("log_format") == "connection lost":
            return PredicateResult.no
        if event.get("log_namespace") == "log_legacy" and _PORT_CHATTER.fullmatch(
                event.get("log_text", "")):
            return PredicateResult.no
        return PredicateResult.maybe


class SecondsText:
    """`formatTime` for log lines, worked out once a second (the lines show whole
    seconds): a timezone and strftime per line were 2 % of a worker's time in a
    reconnect storm."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(None)
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second, timeFormatRFC3339)
        return self._text


def text_observer(destination: Any) -> FileLogObserver:
    """twisted.logger's `textFileLogObserver`, its lines the same."""
    when = SecondsText()
    return FileLogObserver(destination,
                           lambda event: formatEventAsClassicLogText(event, formatTime=when))


def filtered_observer(destination: Any, level: LogLevel) -> ILogObserver:
    return FilteringLogObserver(text_observer(destination),
                                [RoutineChatter(level),
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
            GatedLogger.drop_below(self.level)
        return result
