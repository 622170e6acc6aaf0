"""Operators' device sessions: a `sessions` row each, an asciicast recording for a
session with a pty, and the retention of those recordings.

Recorded is what the operator's terminal was sent (the device's output and
window changes), never what the operator typed: keystrokes include passwords
typed at the device's prompts, which the echo of a pty does not show.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from twisted.conch.ssh.common import getNS
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.castfile import FLUSH_DELAY, MAX_PENDING, CastFile, RunInThread, Sink
from hub.errors import HubError
from hub.rules import asciicast
from hub.rules.retention import Kept, RetentionRules
from hub.store.offthread import InlineCalls, RegistryCalls
from hub.store.registry import Registry
from hub.store.sessions import SessionLog

log = Logger()

# How often the hub applies the retention rules (also once at start).
PRUNE_INTERVAL = 3600.0


def open_recordings(store: Registry, directory: str | None, clock: IReactorTime,
                    run_in_thread: RunInThread, rules: RetentionRules,
                    calls: RegistryCalls | None = None) -> Recordings:
    """The sessions table in `store` and the recordings `directory` (None: no
    recordings, rows only), created 0700: recordings show what devices printed.
    The rows are written through `calls` (the hub's registry thread)."""
    if directory is not None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        except OSError as e:
            raise HubError(f"{directory}: cannot create: {e.strerror}") from None
    return Recordings(SessionLog(store), directory, clock, run_in_thread, rules,
                      calls=calls or InlineCalls(store))


def _begin_row(registry: Registry, user: str, node: str, source: str, kind: str,
               started: float, command: str | None,
               directory: str | None) -> tuple[int, str | None]:
    """The session's new row and its recording's path (run in the registry thread)."""
    def path(i: int) -> str:
        assert directory is not None
        return os.path.join(directory, f"{i:06d}-{node}.cast")

    session = SessionLog(registry).begin(user, node, source, kind, started, command,
                                         path if directory is not None else None)
    return session, None if directory is None else path(session)


def _recorded(registry: Registry) -> list[tuple[Kept, str]]:
    return SessionLog(registry).recorded()


def _forget_recording(registry: Registry, session: int) -> None:
    SessionLog(registry).forget_recording(session)


class SessionRecord:
    """One device session being recorded (or only logged, without a cast file).

    Its row is written in the registry thread: until it exists (`opened`), the
    recording's lines wait here (at most `max_pending` bytes, as for the disk)."""

    def __init__(self, owner: Recordings, started: float, label: str, recorded: bool) -> None:
        self.id: int | None = None
        self.started = started
        self.cast: CastFile | None = None
        self.label = label  # "session 12 (alice on site-a)", for the log
        self._owner = owner
        self._text = asciicast.OutputText()
        self._exit: tuple[int | None, str | None] = (None, None)
        self._done = False
        self._early: list[bytes] | None = [] if recorded else None
        self._early_bytes = 0
        self._early_lost = False
        self._finished: tuple[float, int, int] | None = None

    @property
    def _recording(self) -> bool:
        if self._early_lost:
            return False
        return self._early is not None or (self.cast is not None and self.cast.stopped is None)

    def output(self, data: bytes | memoryview) -> None:
        if self._recording:
            text = self._text.feed(data)
            if text:
                self._event(asciicast.OUTPUT, text)

    def resized(self, window_change: bytes) -> None:
        size = asciicast.window_size(window_change)
        if self._recording and size is not None:
            self._event(asciicast.RESIZE, f"{size[0]}x{size[1]}")

    def exited(self, kind: bytes, data: bytes) -> None:
        try:
            if kind == b"exit-status":
                self._exit = (struct.unpack(">L", data[:4])[0], None)
            else:
                self._exit = (None, bytes(getNS(data)[0]).decode("ascii", "replace"))
        except struct.error:
            pass

    def _event(self, code: str, text: str) -> None:
        self._line(asciicast.event(self._owner.clock.seconds() - self.started, code, text))

    def _line(self, line: bytes) -> None:
        if self.cast is not None:
            self.cast.write(line)
        elif self._early is not None and not self._early_lost:
            if self._early_bytes + len(line) > self._owner.max_pending:
                self._early_lost = True  # the row is late: the recording stops here
                return
            self._early.append(line)
            self._early_bytes += len(line)

    def opened(self, session: int | None, recording: str | None) -> None:
        """The session's row is written (None: it could not be): the recording starts
        with what waited, and a session that ended meanwhile is finished."""
        self.id = session
        early, self._early = self._early, None
        if session is not None:
            self.label = f"session {session} {self.label}"
            if recording is not None and early is not None:
                self.cast = self._owner.cast(session, recording, self.label)
                for line in early:
                    self.cast.write(line)
                if self._early_lost:
                    self._owner.stopped(session, self.label, "more than "
                                        f"{self._owner.max_pending} bytes waiting for the registry")
        if self._finished is not None:
            self._finish_row(*self._finished)

    def finish(self, to_device: int, from_device: int) -> None:
        if self._done:
            return
        self._done = True
        rest = self._text.end()
        if rest and self._recording:
            self._event(asciicast.OUTPUT, rest)
        self._finished = (self._owner.clock.seconds(), to_device, from_device)
        if self.id is not None or self._early is None:
            self._finish_row(*self._finished)

    def _finish_row(self, ended: float, to_device: int, from_device: int) -> None:
        cast, size, truncated = self.cast, 0, self._early_lost
        if cast is not None:
            size, truncated = cast.accepted, truncated or cast.stopped is not None
        session = self.id
        if session is None:
            return  # no row to finish (logged when it failed)
        self._owner.calls.write(lambda r: SessionLog(r).finish(
            session, ended, *self._exit, to_device, from_device, size, truncated))
        if cast is not None:
            # What is still queued goes out now; a failure there marks the row truncated.
            cast.close().addBoth(lambda _: self._owner.live.discard(session))


class Recordings:
    """Starts session rows and recordings (`directory` None: rows only) and prunes."""

    def __init__(self, log: SessionLog, directory: str | None, clock: IReactorTime,
                 run_in_thread: RunInThread, rules: RetentionRules | None = None, *,
                 max_pending: int = MAX_PENDING, flush_delay: float = FLUSH_DELAY,
                 open_sink: Callable[[str], Sink] | None = None,
                 calls: RegistryCalls) -> None:
        self.log = log  # for reading the rows; they are written through `calls`
        self.calls = calls
        self.directory = directory
        self.clock = clock
        self.rules = rules or RetentionRules()
        self.live: set[int] = set()  # sessions whose recording is being written
        self._run = run_in_thread
        self.max_pending = max_pending
        self._flush_delay = flush_delay
        self._open_sink = open_sink

    def begin(self, user: str, node: str, source: str, kind: str, request: tuple[bytes, bytes],
              pty: bytes | None) -> SessionRecord:
        """A device session opened: its row (written in the registry thread), and a
        recording when it has a pty."""
        now = self.clock.seconds()
        command = _command(*request)
        recorded = self.directory is not None and pty is not None
        record = SessionRecord(self, now, f"({user} on {node})", recorded)
        if recorded:
            assert pty is not None
            term, cols, rows = asciicast.pty_size(pty)
            record._line(asciicast.header(cols, rows, int(now), term, f"{user} on {node}"))

        def failed(f: Failure) -> None:
            log.error("the sessions row of {user} on {node} could not be written: {why}; "
                      "the session goes on unrecorded", user=user, node=node,
                      why=f.getErrorMessage())
            record.opened(None, None)

        self.calls.call(_begin_row, user, node, source, kind, now, command,
                        self.directory if recorded else None).addCallbacks(
            lambda row: record.opened(*row), failed)
        return record

    def cast(self, session: int, path: str, label: str) -> CastFile:
        """The recording file of `session`, being written."""
        kw: dict[str, Any] = {"max_pending": self.max_pending, "clock": self.clock,
                              "flush_delay": self._flush_delay}
        if self._open_sink is not None:
            kw["open_sink"] = self._open_sink
        self.live.add(session)
        return CastFile(path, self._run, lambda why: self.stopped(session, label, why), **kw)

    def stopped(self, session: int, label: str, why: str) -> None:
        log.warn("{label}: recording stopped, the session goes on unrecorded: {why}",
                 label=label, why=why)
        self.calls.write(lambda r: SessionLog(r).mark_truncated(session))

    # -- retention ---------------------------------------------------------------

    def prune(self) -> defer.Deferred[list[tuple[Kept, str]]]:
        """Apply the retention rules: files are looked at and deleted in a pool thread,
        then the rows lose their `recording` and each deletion is logged."""
        live = set(self.live)

        def look(recorded: list[tuple[Kept, str]]) -> defer.Deferred[list[tuple[Kept, str]]]:
            files: defer.Deferred[list[tuple[Kept, str, str]]] = defer.maybeDeferred(
                self._run, _prune_files, recorded, self.rules, self.clock.seconds(), live)
            return files.addCallback(self._pruned)

        return self.calls.call(_recorded).addCallback(look).addErrback(self._prune_failed)

    def _prune_failed(self, f: Failure) -> list[tuple[Kept, str]]:
        log.failure("pruning recordings failed", f)
        return []

    def _pruned(self, removed: list[tuple[Kept, str, str]]) -> list[tuple[Kept, str]]:
        for kept, path, why in removed:
            self.calls.write(_forget_recording, kept.id)
            log.info("recording of session {id} removed ({why}): {path}",
                     id=kept.id, why=why, path=path)
        return [(k, why) for k, _, why in removed]


def _prune_files(recorded: Sequence[tuple[Kept, str]], rules: RetentionRules, now: float,
                 live: set[int]) -> list[tuple[Kept, str, str]]:
    """(In a pool thread.) The sizes on disk, the rules' choice, the deletions."""
    paths = {kept.id: path for kept, path in recorded}
    sized = []
    for kept, path in recorded:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        sized.append(Kept(kept.id, kept.start, size))
    removed = []
    for kept, why in rules.prune(sized, now, live):
        path = paths[kept.id]
        try:
            os.unlink(path)
        except FileNotFoundError:
            why = f"{why}; the file was already gone"
        removed.append((kept, path, why))
    return removed


def _command(kind: bytes, data: bytes) -> str | None:
    """The command of an exec request, the name of a subsystem; None for a shell."""
    if kind not in (b"exec", b"subsystem") or not data:
        return None
    try:
        return bytes(getNS(data)[0]).decode("utf-8", "replace")
    except struct.error:
        return None
