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
from hub.store.sessions import SessionLog, Store

log = Logger()

# How often the hub applies the retention rules (also once at start).
PRUNE_INTERVAL = 3600.0


def open_recordings(store: Store, directory: str | None, clock: IReactorTime,
                    run_in_thread: RunInThread, rules: RetentionRules) -> Recordings:
    """The sessions table in `store` and the recordings `directory` (None: no
    recordings, rows only), created 0700: recordings show what devices printed."""
    if directory is not None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        except OSError as e:
            raise HubError(f"{directory}: cannot create: {e.strerror}") from None
    return Recordings(SessionLog(store), directory, clock, run_in_thread, rules)


class SessionRecord:
    """One device session being recorded (or only logged, without a cast file)."""

    def __init__(self, owner: Recordings, session: int, started: float,
                 cast: CastFile | None, label: str) -> None:
        self.id = session
        self.started = started
        self.cast = cast
        self.label = label  # "alice on site-a", for the log
        self._owner = owner
        self._text = asciicast.OutputText()
        self._exit: tuple[int | None, str | None] = (None, None)
        self._done = False

    def output(self, data: bytes | memoryview) -> None:
        if self.cast is not None and self.cast.stopped is None:
            text = self._text.feed(data)
            if text:
                self._event(asciicast.OUTPUT, text)

    def resized(self, window_change: bytes) -> None:
        size = asciicast.window_size(window_change)
        if self.cast is not None and size is not None:
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
        assert self.cast is not None
        self.cast.write(asciicast.event(self._owner.clock.seconds() - self.started, code, text))

    def finish(self, to_device: int, from_device: int) -> None:
        if self._done:
            return
        self._done = True
        cast, size, truncated = self.cast, 0, False
        if cast is not None:
            rest = self._text.end()
            if rest and cast.stopped is None:
                self._event(asciicast.OUTPUT, rest)
            size, truncated = cast.accepted, cast.stopped is not None
        self._owner.log.finish(self.id, self._owner.clock.seconds(), *self._exit,
                               to_device, from_device, size, truncated)
        if cast is not None:
            # What is still queued goes out now; a failure there marks the row truncated.
            cast.close().addBoth(lambda _: self._owner.live.discard(self.id))


class Recordings:
    """Starts session rows and recordings (`directory` None: rows only) and prunes."""

    def __init__(self, log: SessionLog, directory: str | None, clock: IReactorTime,
                 run_in_thread: RunInThread, rules: RetentionRules | None = None, *,
                 max_pending: int = MAX_PENDING, flush_delay: float = FLUSH_DELAY,
                 open_sink: Callable[[str], Sink] | None = None) -> None:
        self.log = log
        self.directory = directory
        self.clock = clock
        self.rules = rules or RetentionRules()
        self.live: set[int] = set()  # sessions whose recording is being written
        self._run = run_in_thread
        self._max_pending = max_pending
        self._flush_delay = flush_delay
        self._open_sink = open_sink

    def begin(self, user: str, node: str, source: str, kind: str, request: tuple[bytes, bytes],
              pty: bytes | None) -> SessionRecord:
        """A device session opened: its row, and a recording when it has a pty."""
        now = self.clock.seconds()
        command = _command(*request)
        recorded = self.directory is not None and pty is not None
        directory = self.directory or ""
        session = self.log.begin(
            user, node, source, kind, now, command,
            (lambda i: os.path.join(directory, f"{i:06d}-{node}.cast")) if recorded else None)
        label = f"session {session} ({user} on {node})"
        cast = None
        if recorded:
            assert pty is not None
            row = self.log.get(session)
            assert row is not None and row.recording is not None
            kw: dict[str, Any] = {"max_pending": self._max_pending, "clock": self.clock,
                                  "flush_delay": self._flush_delay}
            if self._open_sink is not None:
                kw["open_sink"] = self._open_sink
            cast = CastFile(row.recording, self._run,
                            lambda why: self._stopped(session, label, why), **kw)
            term, cols, rows = asciicast.pty_size(pty)
            cast.write(asciicast.header(cols, rows, int(now), term, f"{user} on {node}"))
            self.live.add(session)
        return SessionRecord(self, session, now, cast, label)

    def _stopped(self, session: int, label: str, why: str) -> None:
        log.warn("{label}: recording stopped, the session goes on unrecorded: {why}",
                 label=label, why=why)
        self.log.mark_truncated(session)

    # -- retention ---------------------------------------------------------------

    def prune(self) -> defer.Deferred[list[tuple[Kept, str]]]:
        """Apply the retention rules: files are looked at and deleted in a pool thread,
        then the rows lose their `recording` and each deletion is logged."""
        recorded = self.log.recorded()
        live = set(self.live)
        d = defer.maybeDeferred(self._run, _prune_files, recorded, self.rules,
                                self.clock.seconds(), live)
        d.addCallback(self._pruned)
        d.addErrback(self._prune_failed)
        return d

    def _prune_failed(self, f: Failure) -> list[tuple[Kept, str]]:
        log.failure("pruning recordings failed", f)
        return []

    def _pruned(self, removed: list[tuple[Kept, str, str]]) -> list[tuple[Kept, str]]:
        for kept, path, why in removed:
            self.log.forget_recording(kept.id)
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
