from __future__ import annotations

import fcntl
import io
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    eventAsJSON,
    eventAsText,
    eventFromJSON,
    formatEventAsClassicLogText,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from hub.app.logs import (
    FdText,
    HeldWrites,
    HubService,
    RoutineChatter,
    SecondsText,
    classic_line,
    event_text,
    filtered_observer,
    parse_level,
    twistd_destination,
)
from hub.errors import ConfigError
from hub.ssh.loglevel import GatedLogger


class Recording:
    """A destination that keeps each write and counts the flushes."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        self.flushes += 1


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
    def standard_output(destination: object) -> bool:
        return destination is sys.stdout or (
            isinstance(destination, FdText) and destination.fd == sys.stdout.fileno())

    assert standard_output(twistd_destination({"nodaemon": True, "logfile": None}))
    assert standard_output(twistd_destination({"logfile": "-"}))
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
    event = {"log_format": "x", "log_namespace": "hub.tunnel.live"}
    assert chatter({**event, "log_level": LogLevel.debug}) is PredicateResult.no
    assert chatter({**event, "log_level": LogLevel.info}) is PredicateResult.yes
    debugging = RoutineChatter(LogLevel.debug)
    assert debugging({**event, "log_level": LogLevel.debug}) is PredicateResult.yes


def test_the_chatter_filter_keeps_what_twisteds_level_filter_keeps() -> None:
    """`RoutineChatter` is the whole filter: for every level it is set to, it drops
    what `LogLevelFilterPredicate` with that default level drops (no level, no
    namespace, below the level) and keeps what it keeps, routine chatter aside."""
    levels = list(LogLevel.iterconstants())
    for level in levels:
        ours, twisteds = RoutineChatter(level), LogLevelFilterPredicate(defaultLogLevel=level)
        for event_level in [*levels, None]:
            for namespace in ("hub.tunnel.live", "log_legacy", "", None):
                event: dict[str, Any] = {"log_format": "node {n} online", "n": "a"}
                if event_level is not None:
                    event["log_level"] = event_level
                if namespace is not None:
                    event["log_namespace"] = namespace
                kept = ours(event) is not PredicateResult.no
                assert kept == (twisteds(event) is not PredicateResult.no), (level, event)


def running_clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.running = True  # as the reactor is while it turns (MemoryReactor.run stops at once)
    return clock


def test_held_lines_go_out_in_one_write_after_the_delay() -> None:
    clock, out = running_clock(), Recording()
    held = HeldWrites(out, clock, 0.05)
    log = Logger(observer=filtered_observer(held, LogLevel.info), namespace="hub.tunnel.live")
    for node in ("site-a", "site-b", "site-c"):
        log.info("node {node} online", node=node)
    clock.advance(0.04)
    assert out.writes == []
    clock.advance(0.01)
    [written] = out.writes
    assert [line.split(" ", 2)[2] for line in written.splitlines()] == [
        "node site-a online", "node site-b online", "node site-c online"]
    assert out.flushes == 1 and not clock.getDelayedCalls()
    log.info("node {node} offline", node="site-a")
    held.flush_now()  # as the reactor stops
    assert out.writes[-1].endswith("node site-a offline\n") and out.flushes == 2
    assert not clock.getDelayedCalls()
    held.flush_now()
    assert out.flushes == 2  # nothing held, nothing written


def test_another_threads_line_goes_out_at_once_after_what_is_held() -> None:
    clock, out = running_clock(), Recording()
    held = HeldWrites(out, clock, 0.05)
    held.write("first\n")
    worker = threading.Thread(target=held.write, args=("from the registry thread\n",))
    worker.start()
    worker.join()
    assert out.writes == ["first\nfrom the registry thread\n"]
    clock.advance(0.05)
    assert out.writes == ["first\nfrom the registry thread\n"] and out.flushes == 1


def test_a_signal_handlers_line_in_the_middle_of_a_write_is_written_not_waited_for() -> None:
    """Twisted's SIGTERM handler logs on the reactor's thread, wherever it stopped
    it: in the middle of this class's own write it must not wait for the lock its
    own thread holds (a worker hung there for good, its tunnels open)."""
    clock = running_clock()

    class Interrupted(Recording):
        def write(self, text: str) -> None:
            super().write(text)
            if text.startswith("node"):  # the signal arrives during the write
                held.write("Received SIGTERM, shutting down.\n")

    out = Interrupted()
    held = HeldWrites(out, clock, 0.05)
    held.write("node a online\n")
    flushing = threading.Thread(target=clock.advance, args=(0.05,), daemon=True)
    flushing.start()  # not on the reactor's thread: held.write writes at once there
    flushing.join(5)
    assert not flushing.is_alive(), "the write waited for its own lock"
    assert out.writes == ["node a online\n", "Received SIGTERM, shutting down.\n"]
    assert out.flushes == 2


def test_a_signal_handlers_line_during_the_flush_is_written_too() -> None:
    """The pipe write itself is most likely in the flush: a line logged there goes
    out before the write returns, not whenever the next line comes (after the
    reactor stopped, never)."""
    clock = running_clock()

    class InterruptedFlush(Recording):
        def flush(self) -> None:
            super().flush()
            if self.flushes == 1:
                held.write("Received SIGTERM, shutting down.\n")

    out = InterruptedFlush()
    held = HeldWrites(out, clock, 0.05)
    held.write("node a online\n")
    held.flush_now()
    assert out.writes == ["node a online\n", "Received SIGTERM, shutting down.\n"]
    held.write_now("figures\n")  # a record that must not wait
    assert out.writes[-1] == "figures\n"


def test_lines_go_out_at_once_while_the_reactor_is_not_running() -> None:
    """Before it starts and after it stopped (twistd ends a hub stopped by a signal
    with that signal: no exit handler would write what is held)."""
    clock, out = MemoryReactorClock(), Recording()
    held = HeldWrites(out, clock, 0.05)
    held.write("starting\n")
    assert out.writes == ["starting\n"] and not clock.getDelayedCalls()
    clock.running = True
    held.write("node a online\n")
    clock.running = False  # stopped before the delay ran out
    held.write("Main loop terminated.\n")
    assert out.writes == ["starting\n", "node a online\nMain loop terminated.\n"]


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


class Shown:
    """A field with its own str, repr and format, and an attribute and an item."""

    name = "port 22"

    def __str__(self) -> str:
        return "shown"

    def __repr__(self) -> str:
        return "<Shown>"

    def __format__(self, spec: str) -> str:
        return f"shown:{spec}" if spec else str(self)

    def __getitem__(self, key: str) -> str:
        return f"item {key}"

    def count(self) -> int:
        return 3


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


class Cancelled(BaseException):
    pass


class Interrupting:
    """A field whose formatting raises what is not an `Exception`."""

    def __format__(self, spec: str) -> str:
        raise Cancelled("cancelled")

    def __repr__(self) -> str:
        return "<Interrupting>"


class Formatting(str):
    """A text whose `format` is not itself: twisted.logger joins a system's text."""

    def __format__(self, spec: str) -> str:
        return "FORMATTED"


class System:
    def __str__(self) -> str:
        return Formatting("worker 1")


def events() -> list[dict[str, Any]]:
    """Events of every shape the hub's lines come from, and of shapes they should not."""
    base = {"log_level": LogLevel.info, "log_namespace": "hub.tunnel.sessions",
            "log_time": 1_700_000_000.25}
    try:
        1 / 0  # noqa: B018 - a real traceback for the failure's lines
    except ZeroDivisionError:
        failure = Failure()
    fields: list[dict[str, Any]] = [
        {"log_format": "Accepted publickey for {user} from {host} port {port} ssh2: {alg} {fp}",
         "user": "cms", "host": "192.0.2.1", "port": 40000, "alg": "ED25519", "fp": "SHA256:x"},
        {"log_format": "node {node!r} online from {peer!s}; {n:,} bytes {ratio:.2f}",
         "node": "site-a", "peer": Shown(), "n": 1234567, "ratio": 0.5},
        {"log_format": "{s} {s!r} {s:>5} {s.name} {s[key]} {{braces}} {v:{w}}",
         "s": Shown(), "v": 7, "w": 4},
        {"log_format": "{n()} calls {s.count()}", "n": lambda: "called", "s": Shown()},
        {"log_format": "a literal () in the text, {x}", "x": 1},
        {"log_format": "missing {nowhere}"},
        {"log_format": "positional {} {0}"},
        {"log_format": "bad spec {x:%}", "x": "text"},
        {"log_format": "unclosed {x", "x": 1},
        {"log_format": "raises {u}", "u": Unprintable()},
        {"log_format": b"bytes format {x}", "x": "b"},
        {"log_format": 17},
        {"log_format": ""},
        {"log_format": "{x}", "x": ""},
        {},
        {"log_format": "two\nlines {x}\n", "x": "and\nmore"},
        {"log_format": "failed: {why}", "why": "boom", "log_failure": failure},
        {"log_format": "{log_text}", "log_text": "a legacy line", "log_system": "worker 1"},
        {"log_format": "system {x}", "x": 1, "log_system": Unprintable()},
        {"log_format": "system {x}", "x": 1, "log_system": 42},
        {"log_format": "no level", "log_level": None},
        {"log_format": "no namespace or level", "log_level": None, "log_namespace": None},
        {"log_format": "no time", "log_time": None},
        # twisted.logger looks attributes up on its wrapper of the field:
        {"log_format": "{s.__class__.__name__} {s._wrapped}", "s": Shown()},
        {"log_format": "{n.__class__}", "n": 3},
        {"log_format": "{i}", "i": Interrupting()},
        {"log_format": "system {x}", "x": 1, "log_system": System()},
        {"log_format": "system {x}", "x": Formatting("x"), "log_system": Formatting("s")},
    ]
    made = [{**base, **f} for f in fields]
    made.append({"log_format": "bare"})  # no level, namespace or time at all
    flattened = eventFromJSON(eventAsJSON({**base, "log_format": "{x} flat", "x": [1, 2]}))
    return [*made, flattened]


@pytest.mark.parametrize("index", range(len(events())))
def test_the_hubs_formatting_makes_twisteds_text_of_every_event(index: int) -> None:
    """`str.format_map` fills in the formats; what twisted.logger would make of each
    event, `event_text` and `classic_line` make, unformattable events included."""
    event = events()[index]
    theirs = eventAsText(event, includeTimestamp=False, includeSystem=False)
    assert event_text(event) == theirs
    when = SecondsText()
    assert classic_line(event, when) == formatEventAsClassicLogText(event, formatTime=when)


def test_the_hubs_formatting_runs_no_python_formatter_for_plain_lines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of `event_text`: an ordinary line never reaches twisted.logger's
    formatter (an unformattable one still does, so it is worded as twisted words it)."""
    import twisted.logger._format as formatting

    calls: list[str] = []
    real = formatting.formatWithCall
    monkeypatch.setattr(formatting, "formatWithCall",
                        lambda fmt, mapping: calls.append(fmt) or real(fmt, mapping))
    line = classic_line({"log_format": "node {node} online from {peer}", "node": "a",
                         "peer": "192.0.2.1", "log_level": LogLevel.info,
                         "log_namespace": "hub", "log_time": 1_700_000_000.0})
    assert line is not None and line.endswith(" [hub#info] node a online from 192.0.2.1\n")
    assert calls == []
    assert "Unable to format event" in event_text({"log_format": "{nowhere}"})
    assert calls == ["{nowhere}"]


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


WRITER = """
import signal, sys
from hub.app.logs import FdText, HeldWrites

class Clock:
    running = True

    def callLater(self, delay, f):
        return None

out = HeldWrites(FdText(1) if sys.argv[1] == "fd" else sys.stdout, Clock(), 0.05)
signal.signal(signal.SIGUSR1, lambda signum, frame: out.write("\\x1eRECEIVED SIGUSR1\\n"))
for i in range(20000):
    out.write("\\x1e[%d,%s]\\n" % (i, "x" * 60))
sys.stderr.write("writing\\n")
sys.stderr.flush()
out.flush_now()  # 1.4 MB into a pipe nobody reads yet: the write blocks
"""


def waiting_in(fd: int) -> int:
    """Bytes written into a pipe and not read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]


def test_a_signal_during_a_write_blocked_on_a_full_pipe_loses_nothing() -> None:
    """A worker's records wait for worker 0 in a full pipe when SIGTERM comes: every
    record arrives whole, the handler's line after them. Through `sys.stdout` (its
    buffered writer returns short when the signal interrupts it, and TextIOWrapper
    drops the rest) 800 of 20,000 arrived, the last one torn; the hub writes to
    the descriptor (`FdText`). The signal is sent once the pipe is full, with the
    child writing the rest, so the write it interrupts is a blocked one."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, "fd"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=Path(__file__).parent.parent)
    assert child.stdout is not None and child.stderr is not None
    assert child.stderr.readline() == b"writing\n"
    capacity = fcntl.fcntl(child.stdout.fileno(), fcntl.F_GETPIPE_SZ)
    deadline = time.monotonic() + 30
    while waiting_in(child.stdout.fileno()) < capacity:
        assert time.monotonic() < deadline, "the child's write never filled the pipe"
        time.sleep(0.01)
    time.sleep(0.05)  # the child is in its write, waiting for room
    child.send_signal(signal.SIGUSR1)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err.decode()
    records = out.split(b"\n")[:-1]
    assert len(records) == 20001 and records[-1] == b"\x1eRECEIVED SIGUSR1"
    assert records[:-1] == [f"\x1e[{i},{'x' * 60}]".encode() for i in range(20000)]
