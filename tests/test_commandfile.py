"""CommandFileWriter against regular files and real FIFOs: it never blocks, keeps order, stays
bounded and catches up when a reader appears."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent

from hub.intake.commandfile import DROP_NOTE_INTERVAL, CommandFileWriter


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "nagios.cmd"
    os.mkfifo(path)
    return path


def open_reader(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def line(n: int, size: int = 0) -> str:
    return f"[{n}] PROCESS_HOST_CHECK_RESULT;h{n};0;{'x' * size}\n"


def test_regular_file_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "cmd"
    path.write_text("existing\n")
    clock = MemoryReactorClock()
    writer = CommandFileWriter(str(path), clock)
    writer.write(line(1))
    writer.write(line(2))
    assert path.read_text() == "existing\n" + line(1) + line(2)
    assert writer.pending_bytes == 0 and clock.getDelayedCalls() == []
    writer.close()


def test_fifo_without_reader_queues_and_retries(fifo: Path, logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    writer = CommandFileWriter(str(fifo), clock, retry_interval=2)
    writer.write(line(1))
    writer.write(line(2))
    assert writer.pending_bytes == len(line(1) + line(2))
    assert len(clock.getDelayedCalls()) == 1
    # Logged once when the condition starts, not at each retry.
    clock.advance(2)
    assert sum("cannot open" in formatEvent(e) for e in logged) == 1
    reader = open_reader(fifo)
    try:
        clock.advance(2)
        assert drain(reader) == (line(1) + line(2)).encode()
        assert writer.pending_bytes == 0 and clock.getDelayedCalls() == []
    finally:
        writer.close()
        os.close(reader)


def test_queue_is_bounded_dropping_oldest(fifo: Path, logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    size = len(line(0, 100))
    writer = CommandFileWriter(str(fifo), clock, max_pending_bytes=3 * size)
    for n in range(10):
        writer.write(line(n, 100))
    assert writer.dropped == 7 and writer.pending_bytes == 3 * size
    # Said once when dropping starts, then at most once a minute with the count.
    notes = [formatEvent(e) for e in logged if "dropped" in formatEvent(e)]
    assert notes == [f"command file {fifo}: queue over {3 * size} bytes, dropped 1 oldest "
                     "line(s) (1 dropped so far)"]
    clock.advance(DROP_NOTE_INTERVAL)
    writer.write(line(1, 100))
    notes = [formatEvent(e) for e in logged if "dropped" in formatEvent(e)]
    assert notes[1:] == [f"command file {fifo}: queue over {3 * size} bytes, dropped 7 oldest "
                         "line(s) (8 dropped so far)"]
    reader = open_reader(fifo)
    try:
        clock.advance(1)
        assert drain(reader) == "".join(line(n, 100) for n in (8, 9, 1)).encode()
    finally:
        writer.close()
        os.close(reader)


def test_full_fifo_never_blocks_and_catches_up_in_order(fifo: Path) -> None:
    clock = MemoryReactorClock()
    reader = open_reader(fifo)
    writer = CommandFileWriter(str(fifo), clock)
    lines = [line(n, 3000) for n in range(100)]  # ~300 KB, far over a pipe's 64 KiB
    try:
        for text in lines:
            writer.write(text)  # would hang here if the writer ever blocked
        assert writer.pending_bytes > 0
        received = b""
        for _ in range(200):
            received += drain(reader)
            if writer.pending_bytes == 0:
                break
            clock.advance(1)
        received += drain(reader)
        assert received == "".join(lines).encode()
    finally:
        writer.close()
        os.close(reader)


def test_reader_going_away_is_survived(fifo: Path) -> None:
    clock = MemoryReactorClock()
    reader = open_reader(fifo)
    writer = CommandFileWriter(str(fifo), clock)
    try:
        writer.write(line(1))
        assert drain(reader) == line(1).encode()
        os.close(reader)
        writer.write(line(2))  # EPIPE: held, fd reopened later
        assert writer.pending_bytes == len(line(2))
        reader = open_reader(fifo)
        clock.advance(1)
        assert drain(reader) == line(2).encode()
    finally:
        writer.close()
        os.close(reader)


def test_missing_path_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nagios.cmd"
    clock = MemoryReactorClock()
    writer = CommandFileWriter(str(path), clock)
    writer.write(line(1))
    clock.advance(1)
    assert not path.exists() and writer.pending_bytes == len(line(1))
    os.mkfifo(path)
    reader = open_reader(path)
    try:
        clock.advance(1)
        assert drain(reader) == line(1).encode()
    finally:
        writer.close()
        os.close(reader)


def test_close_stops_retries(fifo: Path) -> None:
    clock = MemoryReactorClock()
    writer = CommandFileWriter(str(fifo), clock)
    writer.write(line(1))
    writer.close()
    assert clock.getDelayedCalls() == []
    with pytest.raises(RuntimeError):
        writer.write(line(2))


def test_unwritable_path_is_logged_as_error(tmp_path: Path, logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    writer = CommandFileWriter(str(tmp_path), clock)  # a directory: EISDIR
    writer.write(line(1))
    errors = [e for e in logged if e["log_level"].name == "error"]
    assert errors and os.strerror(errno.EISDIR) in formatEvent(errors[0])
    writer.close()


def test_a_batch_of_lines_goes_out_in_pipe_buf_writes_in_order(fifo: Path) -> None:
    reader = open_reader(fifo)
    clock = MemoryReactorClock()
    writer = CommandFileWriter(str(fifo), clock)
    lines = [line(n, 50) for n in range(200)]  # about 16 KiB
    writer.write_lines(lines)
    writer.write_lines([])
    size = sum(len(x) for x in lines)
    assert drain(reader) == "".join(lines).encode()
    # Whole lines of at most PIPE_BUF (4096) bytes a write: atomic on a FIFO.
    assert writer.writes <= size // (4096 - 80) + 1 < len(lines)
    assert writer.pending_bytes == 0
    writer.close()
    os.close(reader)
