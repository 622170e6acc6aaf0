"""Writes external-command lines to a Nagios/Icinga command file without blocking the reactor.

The command file is normally a FIFO that the monitoring core reads; it may have no reader (core
stopped: open fails with ENXIO), may not exist yet, or may be full (EAGAIN).  Lines wait in a
bounded in-memory queue and are retried on the injected clock; past the bound the oldest lines
are dropped, with a log line when that starts and at most one a minute after.  A regular
file at the path is appended to.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Iterable

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

# Writes of at most PIPE_BUF bytes to a FIFO are atomic, so batching whole lines up to this
# size never interleaves a line with another writer's.
_PIPE_BUF = 4096
# Conditions that mean "the core is not there yet / not reading now": wait and retry.
_RETRY_OPEN = {errno.ENXIO, errno.ENOENT, errno.EAGAIN, errno.EINTR}
_RETRY_WRITE = {errno.EAGAIN, errno.EINTR}
# Seconds between two log lines about dropped lines.
DROP_NOTE_INTERVAL = 60.0


@define(eq=False)
class CommandFileWriter:
    """Queues lines for `path` and writes what the reader takes, retrying via `clock`."""

    path: str
    clock: IReactorTime
    max_pending_bytes: int = 4 * 1024 * 1024
    retry_interval: float = 1.0
    dropped: int = field(init=False, default=0)
    # os.write calls made (a result batch should cost one per PIPE_BUF, not one a line).
    writes: int = field(init=False, default=0)
    _queue: deque[bytes] = field(init=False, factory=deque)
    _queued_bytes: int = field(init=False, default=0)
    # The unwritten tail of a line a write cut short: it goes out before anything else.
    _partial: bytes = field(init=False, default=b"")
    _fd: int | None = field(init=False, default=None)
    _retry: IDelayedCall | None = field(init=False, default=None)
    _closed: bool = field(init=False, default=False)
    _last_error: int | None = field(init=False, default=None)
    _drop_noted: float | None = field(init=False, default=None)
    _dropped_noted: int = field(init=False, default=0)
    _log = Logger()

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not yet written."""
        return self._queued_bytes + len(self._partial)

    def write(self, line: str) -> None:
        """Queue one command line (it should end with a newline) and write what fits now."""
        self.write_lines((line,))

    def write_lines(self, lines: Iterable[str]) -> None:
        """Queue command lines in order and write what fits now: a batch of results
        goes out in writes of up to PIPE_BUF bytes, not in one write a line."""
        if self._closed:
            raise RuntimeError("CommandFileWriter is closed")
        queued = 0
        for line in lines:
            data = line.encode("utf-8", "replace")
            self._queue.append(data)
            queued += len(data)
        if not queued:
            return
        self._queued_bytes += queued
        self._enforce_bound()
        if self._retry is None:
            self.flush()

    def _enforce_bound(self) -> None:
        dropped = 0
        while self.pending_bytes > self.max_pending_bytes and self._queue:
            self._queued_bytes -= len(self._queue.popleft())
            dropped += 1
        if not dropped:
            return
        self.dropped += dropped
        # Said when dropping starts, then at most every DROP_NOTE_INTERVAL: a core
        # that stays away must not cost a log line per result.
        now = self.clock.seconds()
        if self._drop_noted is not None and now - self._drop_noted < DROP_NOTE_INTERVAL:
            return
        self._drop_noted = now
        count, self._dropped_noted = self.dropped - self._dropped_noted, self.dropped
        self._log.warn(
            "command file {path}: queue over {limit} bytes, dropped {count} oldest "
            "line(s) ({total} dropped so far)",
            path=self.path, limit=self.max_pending_bytes, count=count, total=self.dropped,
        )

    def flush(self) -> None:
        """Write as much as the file takes now; schedule a retry for the rest."""
        self._retry = None
        while self._partial or self._queue:
            if self._fd is None and not self._open():
                break
            chunk = self._partial or self._next_batch()
            try:
                assert self._fd is not None
                self.writes += 1
                written = os.write(self._fd, chunk)
            except OSError as e:
                self._partial = chunk
                if e.errno not in _RETRY_WRITE:
                    # EPIPE: the reader went away (a restarted core makes a new FIFO); reopen.
                    self._note_error(e, "write")
                    self._close_fd()
                break
            self._partial = chunk[written:]
            self._last_error = None
        if (self._partial or self._queue) and not self._closed:
            self._retry = self.clock.callLater(self.retry_interval, self.flush)

    def _next_batch(self) -> bytes:
        batch = [self._queue.popleft()]
        size = len(batch[0])
        while self._queue and size + len(self._queue[0]) <= _PIPE_BUF:
            size += len(self._queue[0])
            batch.append(self._queue.popleft())
        self._queued_bytes -= size
        return b"".join(batch)

    def _open(self) -> bool:
        # No O_CREAT: creating a regular file where the core will make its FIFO would break it.
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as e:
            self._note_error(e, "open", quiet=e.errno in _RETRY_OPEN)
            return False
        return True

    def _note_error(self, e: OSError, op: str, quiet: bool = False) -> None:
        # Log a condition once when it starts, not at every retry.
        if e.errno == self._last_error:
            return
        self._last_error = e.errno
        emit = self._log.info if quiet else self._log.error
        emit(
            "command file {path}: cannot {op} ({error}); {pending} bytes held, retrying",
            path=self.path, op=op, error=e.strerror, pending=self.pending_bytes,
        )

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        """Stop retrying and close the file; lines still queued are discarded."""
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._close_fd()
