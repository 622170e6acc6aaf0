"""The hub's log observer under twistd: twistd's own destination, with a level filter.

Conch logs at debug level for every window adjust and global request; written
out, that costs throughput and drowns what matters. twistd asks the
application for an `ILogObserver` component before building its own, so the
top service installs one when twistd attaches it: the same destination twistd
would use (`--logfile`, stdout with `-n`, else `twistd.log`), filtered at
`--log-level` (default info).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Any

from twisted.application import service
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.transport import SSHTransportBase
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    PredicateResult,
    eventAsText,
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
    storm of thousands of devices, lines that say less than the hub's own).

    It is also the level filter: an event below the level, or without a level or
    a namespace, is dropped as twisted.logger's `LogLevelFilterPredicate` with one
    default level drops it (the hub sets no level per namespace), without that
    predicate's walk through the namespace's parts for every event (about 2 % of a
    worker's time in a reconnect storm)."""

    def __init__(self, level: LogLevel) -> None:
        self.level = level

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        level = event.get("log_level")
        if level is None or level < self.level or not event.get("log_namespace"):
            return PredicateResult.no
        if self.level <= LogLevel.debug or level >= LogLevel.warn:
            return PredicateResult.yes
        source = event.get("log_source")
        if isinstance(source, (SSHChannel, SSHConnection)):
            return PredicateResult.no
        if isinstance(source, SSHTransportBase) and event.get("log_format") == "connection lost":
            return PredicateResult.no
        if event.get("log_namespace") == "log_legacy" and _PORT_CHATTER.fullmatch(
                event.get("log_text", "")):
            return PredicateResult.no
        return PredicateResult.yes


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


def event_text(event: LogEvent) -> str:
    """What twisted.logger's `eventAsText` makes of an event without its time and
    system: its format filled in, a failure's traceback after it.

    The format is filled in by `str.format_map`, in C, where twisted.logger's
    `formatWithCall` runs `string.Formatter` in Python (5-7 % of a worker's time in
    a reconnect storm). Both read the same fields the same way; a format with `()`
    in it (twisted.logger's "call this field" syntax), a flattened event, one with
    a failure, and one whose fields do not fit its format go to twisted.logger,
    which also words the line for an event it cannot format (a field's `__format__`
    then runs twice). So does a format naming an attribute that begins with `_`:
    twisted.logger looks attributes up on its own wrapper of each field, whose
    `_wrapped`, `__class__` and other dunders are not the field's."""
    fmt = event.get("log_format")
    if type(fmt) is str and "()" not in fmt and "._" not in fmt \
            and "log_flattened" not in event and "log_failure" not in event:
        try:
            return fmt.format_map(event)
        except BaseException:  # noqa: S110 - twisted.logger says what was wrong, below
            pass
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


def classic_line(event: LogEvent, when: Any = formatTime) -> str | None:
    """twisted.logger's `formatEventAsClassicLogText` (`TIME [SYSTEM] TEXT`, the
    lines after the first indented by a tab), the text made by `event_text`."""
    text = event_text(event)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    # Joined, not formatted, as twisted.logger joins them: a str subclass's
    # `__format__` is not run.
    line = "".join([when(event.get("log_time")), " [", system, "] ", text])
    return line.replace("\n", "\n\t") + "\n"


def text_observer(destination: Any) -> FileLogObserver:
    """twisted.logger's `textFileLogObserver`, its lines the same."""
    when = SecondsText()
    return FileLogObserver(destination, lambda event: classic_line(event, when))


def filtered_observer(destination: Any, level: LogLevel) -> ILogObserver:
    return FilteringLogObserver(text_observer(destination), [RoutineChatter(level)])


class HeldWrites:
    """A log destination whose lines are written and flushed together: what the
    thread that made it (the reactor's) logs goes out `delay` seconds later in one
    write with whatever follows meanwhile. A worker's records go to worker 0 this
    way: `FileLogObserver` flushes after each record, and a pipe write per record
    woke worker 0 for each (in a reconnect storm worker 1 logs three lines per
    device, and relaying them was 6 % of worker 0's time).

    A line logged on another thread (the registry's, bcrypt's pool), or while the
    reactor is not running (before it starts, and after it stopped), goes out at
    once, after what is held, so the order is kept: only the reactor's thread may
    schedule the write. A signal handler runs on the reactor's thread between two
    steps of whatever it interrupted, this class's own write included, and
    Twisted's logs ("Received SIGTERM"): its line is added to what is being written
    (the lock is reentrant, and the write goes on until nothing is held), never
    waited for. `flush_now` writes what is held (as the reactor stops); a process
    killed outright loses at most `delay` seconds of lines."""

    def __init__(self, out: Any, clock: IReactorTime, delay: float) -> None:
        self._out, self._clock, self._delay = out, clock, delay
        self._held: list[str] = []
        self._pending: IDelayedCall | None = None
        self._lock = threading.RLock()
        self._writing = False  # under the lock: `_write_held` is under way
        self._thread = threading.get_ident()

    def write(self, text: str) -> None:
        if threading.get_ident() != self._thread or not getattr(self._clock, "running", True):
            self.write_now(text)
            return
        with self._lock:
            self._held.append(text)
            if self._writing:  # a signal handler's line, in the middle of our write
                return
        if self._pending is None:
            self._pending = self._clock.callLater(self._delay, self.flush_now)

    def flush(self) -> None:
        """`FileLogObserver` flushes after each line: held until the call above."""

    def flush_now(self) -> None:
        """Write and flush what is held (on the thread that made this)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        with self._lock:
            self._write_held()

    def write_now(self, text: str) -> None:
        """Write `text` at once, after what is held: a record that must not wait
        (a worker's figures for worker 0), on the one lock every write to `out`
        takes, so a thread logging meanwhile cannot write in the middle of it."""
        with self._lock:
            self._held.append(text)
            self._write_held()

    def _write_held(self) -> None:
        """Write and flush until nothing is held (with the lock held), unless a
        write is under way on this thread already (a signal handler's line):
        that write goes on until nothing is held, so the line goes out too."""
        if self._writing or not self._held:
            return
        self._writing = True
        try:
            while self._held:
                # The list is taken whole, not joined then cleared: a signal
                # handler's line appended in between would be cleared unwritten.
                held, self._held = self._held, []
                self._out.write("".join(held))
                self._out.flush()
        finally:
            self._writing = False


class FdText:
    """Text written to a file descriptor with `os.write` until all of it is out.

    Python's buffered writer returns short when a signal interrupts a write
    blocked on a full pipe or socket, and `TextIOWrapper` drops the rest without
    a word: a SIGTERM as the hub stops (or a SIGCHLD as a worker exits) while a
    worker's records wait for worker 0, or the hub's lines wait for journald,
    tore a record and lost every line after it in that write. `os.write` is
    retried after the handler (PEP 475) and says how much it wrote."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> None:
        view = memoryview(text.encode("utf-8", "backslashreplace"))
        while view:
            view = view[os.write(self.fd, view):]

    def flush(self) -> None:
        """Nothing is buffered."""


def stdout_destination() -> Any:
    """Standard output as a log destination: its descriptor, written whole
    (`FdText`), or `sys.stdout` itself where it has none (a test's capture)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdout
    sys.stdout.flush()  # what was printed before goes first
    return FdText(fd)


def twistd_destination(server_options: Any) -> Any:
    """Where twistd itself would log, from its own options (None: leave it to twistd)."""
    if server_options is None or server_options.get("logger") or server_options.get("syslog"):
        return None
    name = server_options.get("logfile")
    if name == "-" or (not name and server_options.get("nodaemon")):
        return stdout_destination()
    return logfile.LogFile.fromFullPath(name or "twistd.log")


class HubService(service.MultiService):
    """The top service; installs the filtered observer on twistd's application.

    Its lines are written one by one as they are logged, so a line is in the file
    before what it reports reaches the peer (a refusal, a closed connection).
    Holding them to the end of the reactor's turn (`HeldWrites`) was measured at
    3-4 % less hub CPU in a reconnect storm, and left out for that reason."""

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
