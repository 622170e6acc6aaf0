"""One recording file, appended to from the hub's thread pool through a bounded queue.

The reactor never touches the disk: `write` queues a line and returns; one
batch at a time goes to a pool thread, gathered for `flush_delay` seconds so
that a session of keystrokes costs a thread hand-off a few times a second, not
one per keystroke. A disk that is slow (more than
`max_pending` bytes waiting) or failing (an OSError such as ENOSPC) stops
the recording, once, with the reason handed to `on_stop`; the session it
records goes on untouched. What was written before stays a valid recording.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

RunInThread = Callable[..., defer.Deferred[Any]]

# Bytes a recording may have waiting for the disk before it is dropped.
MAX_PENDING = 8 * 1024 * 1024
# Seconds lines are gathered before a batch goes to the thread pool.
FLUSH_DELAY = 0.05


class Sink(Protocol):
    """Where the lines go (in a pool thread): a file opened for appending."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """`path`, created 0600 (a recording shows what the device printed)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        os.close(self._fd)


class CastFile:
    """Queues lines for `path`; `open_sink` runs in a pool thread, as every write does."""

    def __init__(self, path: str, run_in_thread: RunInThread,
                 on_stop: Callable[[str], None], *, max_pending: int = MAX_PENDING,
                 open_sink: Callable[[str], Sink] = FileSink,
                 clock: IReactorTime | None = None, flush_delay: float = 0.0) -> None:
        self.path = path
        self.written = 0  # bytes on disk
        self.stopped: str | None = None  # why the recording stopped, if it did
        self._run = run_in_thread
        self._on_stop = on_stop
        self._max = max_pending
        self._open = open_sink
        self._sink: Sink | None = None
        self._queue: list[bytes] = []
        self._pending = 0  # queued and in flight
        self._busy = False
        self._closing = False
        self._closed: defer.Deferred[None] = defer.Deferred()
        self._clock = clock
        self._delay = flush_delay if clock is not None else 0.0
        self._later: IDelayedCall | None = None

    @property
    def accepted(self) -> int:
        """Bytes taken for the file (written, or still waiting)."""
        return self.written + (0 if self.stopped else self._pending)

    def write(self, line: bytes) -> None:
        if self.stopped is not None or self._closing:
            return
        self._queue.append(line)
        self._pending += len(line)
        if self._pending > self._max:
            self._stop(f"more than {self._max} bytes waiting for the disk")
            return
        if not self._busy:
            self._flush_soon()

    def _flush_soon(self) -> None:
        if self._delay <= 0 or self._clock is None:
            self._flush()
        elif self._later is None:
            self._later = self._clock.callLater(self._delay, self._flush)

    def close(self) -> defer.Deferred[None]:
        """No more lines: the file is closed once what is queued is written."""
        self._closing = True
        if not self._busy:
            self._finish()
        return self._closed

    def _flush(self) -> None:
        if self._later is not None:
            if self._later.active():
                self._later.cancel()
            self._later = None
        if self._busy or not self._queue or self.stopped is not None:
            return
        batch, self._queue = b"".join(self._queue), []
        self._busy = True
        d = self._run(self._write, batch)
        d.addCallbacks(self._written, self._failed)

    def _write(self, batch: bytes) -> int:
        # In a pool thread, one batch at a time: the sink is only touched here.
        if self._sink is None:
            self._sink = self._open(self.path)
        self._sink.write(batch)
        return len(batch)

    def _written(self, n: int) -> None:
        self._busy = False
        self.written += n
        self._pending -= n
        if self.stopped is None and self._queue and not self._closing:
            self._flush_soon()
        elif self.stopped is None and self._queue:
            self._flush()
        elif self._closing or self.stopped is not None:
            self._finish()

    def _failed(self, f: Failure) -> None:
        self._busy = False
        error = f.value
        why = (f"{error.strerror or error} writing {self.path}" if isinstance(error, OSError)
               else f.getErrorMessage())
        self._stop(why)

    def _stop(self, why: str) -> None:
        if self.stopped is not None:
            return
        self.stopped = why
        self._queue, self._pending = [], 0
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        self._on_stop(why)
        if not self._busy:
            self._finish()

    def _finish(self) -> None:
        if self._closed.called or self._busy:
            return
        if self._queue and self.stopped is None:
            self._flush()
            return
        sink, self._sink = self._sink, None
        if sink is None:
            self._closed.callback(None)
            return
        self._run(sink.close).addBoth(lambda _: self._closed.callback(None))
