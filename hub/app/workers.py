"""Worker processes (`--workers N`): worker 0, the twistd process, starts and watches 1..N-1.

Each worker runs the SSH listener (shared with SO_REUSEPORT, `hub.app.sharedport`) and
what it needs: tunnels and their per-device ports, the gateway and jump host, the
registrar, keepalives, the registry poll. Worker 0 alone runs the rest (web console,
metrics, NSCA and NETCONF listeners, the control socket, lease expiry, recording
pruning). A worker's log events come to worker 0 as JSON lines on its stdout (time,
level, namespace and the text, formatted in the worker) and are logged there with the
worker's index; a worker that exits is logged with its status and
started again after a back-off; stopping the hub stops them all; a worker whose stdin
(a pipe from worker 0) closes stops itself, so none outlives worker 0. Worker 0 asks
through that pipe for a worker's live figures when /metrics is scraped; the answer comes
as one record among its log records.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field
from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    LogEvent,
    Logger,
    LogLevel,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.python.failure import Failure

from hub.app.logs import event_text
from hub.rules.figures import Figure, WorkerFigures

log = Logger()

# Restart back-off: 1 s after a quick death, doubling to at most 30 s; a worker
# that ran STABLE seconds before it died starts again at once-ish (the base).
RESTART_BASE = 1.0
RESTART_MAX = 30.0
STABLE = 60.0
# How long a stopping hub waits for its workers after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
RECORD_SEPARATOR = b"\x1e"  # twisted.logger's JSON log format
# Worker 0 asks a worker for its live figures (/metrics) with this line on its stdin;
# the worker answers with one record {FIGURES_KEY: [...]} among its log records.
FIGURES_REQUEST = b"figures\n"
FIGURES_KEY = "callhomehub_figures"
_FIGURES_RECORD = b'{"' + FIGURES_KEY.encode() + b'"'
# How long a scrape waits for the workers' answers before using what they said last.
FIGURES_TIMEOUT = 2.0


def line_record(event: LogEvent) -> str:
    """A worker's log event as it goes to worker 0: `RS [time, level, namespace,
    text] LF`, the text formatted in the worker as worker 0 would (a failure's
    traceback after it). Worker 0 logs it as an event whose text is that text
    (`event_from_line_record`): its line is the same, and encoding and decoding
    the whole event as JSON cost worker 0 and the worker 4-5 % of their time
    in a reconnect storm."""
    level = event.get("log_level", LogLevel.info)
    record = [event.get("log_time"), getattr(level, "name", "info"),
              event.get("log_namespace", "-"), event_text(event)]
    return _RS + json.dumps(record, separators=(",", ":")) + "\n"


_RS = RECORD_SEPARATOR.decode()
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def event_from_line_record(record: bytes) -> LogEvent:
    """The event a `line_record` stands for; ValueError if it is not one."""
    try:
        when, level, namespace, text = json.loads(record)
        return {"log_format": "{log_text}", "log_text": str(text),
                "log_level": _LEVELS.get(level, LogLevel.info),
                "log_namespace": str(namespace),
                "log_time": None if when is None else float(when)}
    except (TypeError, AttributeError) as e:
        raise ValueError(f"not a log record: {e}") from None


def default_workers() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def restart_delay(quick_failures: int, base: float = RESTART_BASE,
                  cap: float = RESTART_MAX) -> float:
    """Seconds before starting a worker again after its `quick_failures`-th death
    in a row (each within STABLE seconds of its start)."""
    return min(cap, base * 2 ** max(0, quick_failures - 1))


# Options a worker does not take from worker 0: it is given its own SSH endpoint
# (the port worker 0 bound) and has no workers of its own; once hub-to-hub peering
# exists, its own peer listener too (worker 0's `--peer` port is worker 0's).
_NOT_PASSED = {"workers", "ssh", "peer"}


def worker_arguments(options: Mapping[str, Any], parameters: list[list[Any]],
                     flags: list[list[Any]], index: int, ssh: str) -> list[str]:
    """The command line of worker `index`: `python -P -m hub.app.worker INDEX` and the
    hub's own options (`--data` and `--config` made absolute), with `--ssh` the
    endpoint worker 0 bound. The one place a worker's arguments are made: the
    hub-to-hub peering adds the worker's hub id (e.g. `HOSTID/w1`) and its peer
    listener (`--peer tcp:0:interface=127.0.0.1`) here. Every other option is passed
    on as worker 0 has it, so a config file's `[cluster] id` would be worker 0's: the
    worker's id must come as an argument that overrides it."""
    # -P: `python -m` would put the directory the hub was started in first on
    # sys.path, and a `hub` package there would be the worker's (a benchmark
    # running an older hub from its work tree ran the work tree's in worker 1).
    args = [sys.executable, "-P", "-m", "hub.app.worker", str(index)]
    for name, *_rest in parameters:
        value = options.get(name)
        if name in _NOT_PASSED or value is None:
            continue
        if name in ("data", "config"):
            value = os.path.abspath(value)
        args.append(f"--{name}={value}")
    for name, *_rest in flags:
        if name not in _NOT_PASSED and options.get(name):
            args.append(f"--{name}")
    args += [f"--ssh={ssh}", "--workers=1"]
    return args


class WorkerProtocol(protocol.ProcessProtocol):
    """One worker process seen from worker 0: its log records and its exit."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        # Each record is RS, JSON (newlines escaped), LF: it is whole at its LF.
        self._out += data
        *records, self._out = self._out.split(b"\n")
        for record in records:
            record = record.strip(RECORD_SEPARATOR + b" \r")
            if record:
                self._publish(record)

    def _publish(self, record: bytes) -> None:
        if record.startswith(_FIGURES_RECORD):
            self._figures(record)
            return
        try:
            if record.startswith(b"["):
                event = event_from_line_record(record)
            else:  # twisted.logger's JSON (a worker of an older hub)
                event = eventFromJSON(record.decode("utf-8", "replace"))
        except ValueError:
            log.warn("worker {index}: unreadable log record {record!r}",
                     index=self.worker.index, record=record[:200])
            return
        level = event.get("log_level")
        name = level.name if isinstance(level, type(LogLevel.info)) else "info"
        event["log_system"] = f"w{self.worker.index} {event.get('log_namespace', '-')}#{name}"
        event["worker"] = self.worker.index
        globalLogPublisher(event)

    def _figures(self, record: bytes) -> None:
        try:
            figures = [(str(kind), str(name), {str(k): str(v) for k, v in labels.items()},
                        float(value))
                       for kind, name, labels, value in json.loads(record)[FIGURES_KEY]]
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            log.warn("worker {index}: unreadable figures record ({why}): {record!r}",
                     index=self.worker.index, why=e, record=record[:200])
            return
        self.worker.heard(figures)

    def errReceived(self, data: bytes) -> None:
        # A worker logs through stdout; stderr is what escaped it (a traceback at exit).
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                log.error("worker {index} stderr: {line}", index=self.worker.index,
                          line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.worker.ended(reason.value)


@define(eq=False)
class Worker:
    """Worker `index`: its process while it runs, its back-off while it does not."""

    supervisor: WorkerSupervisor
    index: int
    process: Any = None
    pid: int | None = None
    started: float = 0.0
    quick_failures: int = 0
    restart: IDelayedCall | None = None
    gone: list[defer.Deferred[None]] = field(factory=list)
    # Scrapes waiting for this worker's figures, and when they stop waiting.
    asked: list[defer.Deferred[None]] = field(factory=list)
    asked_timeout: IDelayedCall | None = None

    def start(self) -> None:
        self.restart = None
        self.started = self.supervisor.clock.seconds()
        self.process = self.supervisor.spawn(WorkerProtocol(self),
                                             self.supervisor.arguments(self.index))
        self.pid = getattr(self.process, "pid", None)
        log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def ask_figures(self) -> defer.Deferred[None]:
        """Ask for the worker's live figures (one question for scrapes that overlap)."""
        if self.process is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        if not self.asked:
            try:
                self.process.write(FIGURES_REQUEST)
            except Exception as e:  # its pipe just closed: it is ending
                log.warn("worker {index}: cannot ask for its figures: {why}",
                         index=self.index, why=e)
                return defer.succeed(None)
            self.asked_timeout = self.supervisor.clock.callLater(
                self.supervisor.figures_timeout, self._answered)
        self.asked.append(d)
        return d

    def heard(self, figures: list[Figure]) -> None:
        self.supervisor.figures.heard(self.index, figures)
        self._answered()

    def _answered(self) -> None:
        if self.asked_timeout is not None and self.asked_timeout.active():
            self.asked_timeout.cancel()
        self.asked_timeout = None
        waiting, self.asked = self.asked, []
        for d in waiting:
            d.callback(None)

    def ended(self, why: BaseException | None) -> None:
        pid = self.pid
        self.process = None
        self.supervisor.figures.stopped(self.index)
        self._answered()
        waiting, self.gone = self.gone, []
        for d in waiting:
            d.callback(None)
        if self.supervisor.stopping:
            log.info("worker {index} (pid {pid}) stopped", index=self.index, pid=pid)
            return
        ran = self.supervisor.clock.seconds() - self.started
        self.quick_failures = self.quick_failures + 1 if ran < STABLE else 1
        delay = restart_delay(self.quick_failures)
        log.error("worker {index} (pid {pid}) {status} after {ran:.1f} s; starting it again "
                  "in {delay:g} s", index=self.index, pid=pid, status=exit_status(why),
                  ran=ran, delay=delay)
        self.restart = self.supervisor.clock.callLater(delay, self.start)

    def stop(self, grace: float) -> defer.Deferred[None]:
        if self.restart is not None and self.restart.active():
            self.restart.cancel()
        self.restart = None
        if self.process is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.gone.append(d)
        self._signal("TERM")
        kill = self.supervisor.clock.callLater(grace, self._signal, "KILL")
        d.addBoth(lambda r: kill.cancel() if kill.active() else None)
        return d

    def _signal(self, name: str) -> None:
        if self.process is not None:
            try:
                self.process.signalProcess(name)
            except error.ProcessExitedAlready:
                pass


def exit_status(why: BaseException | None) -> str:
    """How a process ended, in words: `exited with status 3`, `was killed by signal 9`."""
    sig = getattr(why, "signal", None)
    if sig is not None:
        try:
            return f"was killed by signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"was killed by signal {sig}"
    return f"exited with status {getattr(why, 'exitCode', '?')}"


class WorkerSupervisor(service.Service):
    """Starts workers 1..count-1 with the hub and stops them with it.

    `spawn(protocol, argv)` starts a process (the reactor's spawnProcess with a
    stdin pipe the worker watches); `arguments(index)` is its command line."""

    def __init__(self, count: int, arguments: Callable[[int], list[str]],
                 spawn: Callable[[protocol.ProcessProtocol, list[str]], Any],
                 clock: IReactorTime, grace: float = STOP_GRACE) -> None:
        self.arguments = arguments
        self.spawn = spawn
        self.clock = clock
        self.grace = grace
        self.stopping = False
        self.workers = [Worker(self, index) for index in range(1, count)]
        self.figures = WorkerFigures()
        self.figures_timeout = FIGURES_TIMEOUT

    def ask_figures(self) -> defer.Deferred[None]:
        """Every running worker's live figures into `figures` (for a scrape)."""
        return defer.gatherResults([w.ask_figures() for w in self.workers]).addCallback(
            lambda _: None)

    def startService(self) -> None:
        service.Service.startService(self)
        self.stopping = False
        for worker in self.workers:
            worker.start()

    def stopService(self) -> defer.Deferred[Any]:
        service.Service.stopService(self)
        self.stopping = True
        return defer.gatherResults([w.stop(self.grace) for w in self.workers])


def reactor_spawn(reactor: Any) -> Callable[[protocol.ProcessProtocol, list[str]], Any]:
    """spawnProcess with stdin a pipe (its end is the worker's parent watch), stdout and
    stderr pipes to worker 0, and the hub's environment."""

    def spawn(proto: protocol.ProcessProtocol, argv: list[str]) -> Any:
        return reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ),
                                    childFDs={0: "w", 1: "r", 2: "r"})

    return spawn
