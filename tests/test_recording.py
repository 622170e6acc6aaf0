"""Session recording in memory: the bounded writer (slow and full disks), retention on a
MemoryReactorClock, and gateway sessions recorded end to end through the in-memory hub."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from memory_gateway import PTY, Site, exec_, shell
from twisted.application import internet
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from hub.access.castfile import FLUSH_DELAY, CastFile, FileSink
from hub.access.recordings import PRUNE_INTERVAL, open_recordings
from hub.app.sessions import play
from hub.rules.retention import RetentionRules
from hub.store.registry import Registry


class SlowDisk:
    """A `run_in_thread` whose calls finish only when the test says (a slow disk)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((f, a, d))
        return d

    def finish_one(self) -> None:
        f, a, d = self.calls.pop(0)
        try:
            result = f(*a)
        except Exception:
            d.errback()
        else:
            d.callback(result)


def sync(f: Callable[..., Any], *a: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *a)


class FullDisk:
    """A sink that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = b""

    def write(self, data: bytes) -> None:
        if len(self.data) + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.data += data

    def close(self) -> None:
        pass


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_file_is_0600_and_lines_go_out_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "a.cast")
    disk = SlowDisk()
    cast = CastFile(path, disk, lambda why: None)
    cast.write(b"one\n")
    cast.write(b"two\n")  # queued while the first write is out
    cast.write(b"three\n")
    assert len(disk.calls) == 1
    disk.finish_one()
    assert len(disk.calls) == 1  # the rest in one batch
    disk.finish_one()
    closed = cast.close()
    disk.finish_one()
    assert closed.called
    assert Path(path).read_bytes() == b"one\ntwo\nthree\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert cast.written == cast.accepted == 14


def test_keystrokes_are_gathered_into_one_batch_per_flush_delay(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    disk = SlowDisk()
    cast = CastFile(str(tmp_path / "a.cast"), disk, lambda why: None, clock=clock,
                    flush_delay=FLUSH_DELAY)
    for key in b"uptime\r":
        cast.write(bytes([key]))
    assert disk.calls == []
    clock.advance(FLUSH_DELAY)
    [(_, (batch,), _)] = disk.calls
    assert batch == b"uptime\r"
    cast.write(b"x")
    cast.close()  # closing flushes at once, without waiting for the delay
    disk.finish_one()
    [(_, (batch,), _)] = disk.calls
    assert batch == b"x"


def test_a_slow_disk_drops_the_recording_once_and_never_holds_the_caller(
        tmp_path: Path) -> None:
    stops: list[str] = []
    disk = SlowDisk()
    cast = CastFile(str(tmp_path / "a.cast"), disk, stops.append, max_pending=1000)
    for _ in range(100):
        cast.write(b"x" * 100)  # returns at once, whatever the disk does
    assert stops == ["more than 1000 bytes waiting for the disk"]
    assert cast.stopped is not None
    disk.finish_one()  # the first batch lands late; nothing more is written, the file closes
    [(close, _, _)] = disk.calls
    assert close.__name__ == "close" and isinstance(close.__self__, FileSink)
    disk.finish_one()
    assert (tmp_path / "a.cast").read_bytes() == b"x" * 100
    assert cast.close().called


def test_a_full_disk_stops_the_recording_with_the_reason() -> None:
    stops: list[str] = []
    full = FullDisk(room=10)
    cast = CastFile("/recordings/a.cast", sync, stops.append, open_sink=lambda path: full)
    cast.write(b"12345\n")
    cast.write(b"67890\n")
    cast.write(b"more\n")
    assert stops == ["No space left on device writing /recordings/a.cast"]
    assert full.data == b"12345\n"
    assert cast.close().called


def test_retention_at_start_and_every_interval_on_the_clock(
        tmp_path: Path, logged: list[str]) -> None:
    clock = MemoryReactorClock()
    clock.advance(1000.0)
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    directory = str(tmp_path / "recordings")
    recordings = open_recordings(registry, directory, clock, sync,
                                 RetentionRules(max_age_days=1, max_total_mb=1))
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    first = recordings.begin("alice", "site-a", "192.0.2.1", "shell", (b"shell", b""), PTY)
    first.output(b"y" * 600_000)
    first.finish(1, 600_000)
    clock.advance(43200)
    second = recordings.begin("alice", "site-a", "192.0.2.1", "shell", (b"shell", b""), PTY)
    clock.advance(FLUSH_DELAY)  # its header is on disk
    pruner = internet.TimerService(PRUNE_INTERVAL, recordings.prune)
    pruner.clock = clock
    pruner.startService()  # prunes at once: both within a day and 1 MB, nothing goes
    paths = {r.id: r.recording for r in recordings.log.rows()}
    assert all(p is not None and os.path.exists(p) for p in paths.values())
    assert not any("removed" in line for line in logged)
    second.output(b"x" * 600_000)
    second.finish(1, 600_000)
    clock.advance(PRUNE_INTERVAL)  # now over 1 MB in total: the oldest goes
    rows = {r.id: r for r in recordings.log.rows()}
    assert rows[first.id].recording is None and not os.path.exists(str(paths[first.id]))
    assert rows[first.id].ended is not None  # the row keeps the rest
    assert rows[second.id].recording is not None
    assert any(f"recording of session {first.id} removed (total over 1 MB)" in line
               for line in logged)
    clock.advance(86400)  # a day later the second is too old
    assert recordings.log.get(second.id).recording is None  # type: ignore[union-attr]
    assert any(f"session {second.id} removed (older than 1 days)" in line for line in logged)
    pruner.stopService()


# -- through the in-memory gateway ----------------------------------------------------

@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def replayed(path: str) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as f:
        play(f, out, 0.0, None)
    return bytes(out.getvalue())


def test_a_pty_shell_is_recorded_as_the_operator_saw_it(site: Site) -> None:
    chan = site.operator(b"alice:site-a", shell())
    site.clock.advance(1.5)
    site.type(chan, b"uptime\r")
    site.clock.advance(2.0)
    chan.conn.sendRequest(chan, b"window-change", struct.pack(">4L", 100, 30, 0, 0))
    site.settle()
    site.type(chan, "echo ✓\r".encode())
    site.type(chan, b"exit\r")
    assert chan.status == 0 and chan.is_closed
    [row] = site.hub.recordings.log.rows()  # type: ignore[union-attr]
    assert (row.user, row.node, row.source, row.kind, row.exit_status) == (
        "alice", "site-a", "192.0.2.10", "shell", 0)
    assert row.recording is not None and row.ended is not None
    assert row.bytes_from_device == len(chan.out) and row.bytes_to_device == 21
    assert replayed(row.recording) == chan.out
    lines = Path(row.recording).read_bytes().splitlines()
    head = json.loads(lines[0])
    assert (head["width"], head["height"], head["env"], head["title"]) == (
        80, 24, {"TERM": "xterm"}, "alice on site-a")
    events = [json.loads(line) for line in lines[1:]]
    assert [e[1:] for e in events if e[1] == "r"] == [["r", "100x30"]]
    assert all(e[1] in "or" for e in events)  # no input events: keystrokes are not kept
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert events[-1][0] == pytest.approx(3.5)
    assert stat.S_IMODE(os.stat(row.recording).st_mode) == 0o600
    # The audit keeps its own gateway entry.
    assert [e.action for e in site.hub.registry.audit_log()].count("gateway") == 1


def test_an_exec_session_is_logged_without_a_recording(site: Site) -> None:
    chan = site.operator(b"alice:site-a", exec_(b"hello"))
    assert chan.status == 3
    [row] = site.hub.recordings.log.rows()  # type: ignore[union-attr]
    assert (row.kind, row.command, row.exit_status, row.recording) == ("exec", "hello", 3, None)
    assert row.bytes_from_device == len(chan.out) + len(chan.err)
    assert os.listdir(site.hub.config.recordings_dir) == []


def test_each_chooser_session_is_its_own_recording(site: Site) -> None:
    chan = site.operator(b"alice", shell())
    site.type(chan, b"1\r")
    site.type(chan, b"exit\r")
    site.type(chan, b"site-a\r")
    site.type(chan, b"exit\r")
    site.type(chan, b"q\r")
    rows = site.hub.recordings.log.rows()  # type: ignore[union-attr]
    assert [(r.kind, r.exit_status) for r in rows] == [("shell", 0), ("shell", 0)]
    for r in rows:
        assert r.recording is not None
        assert replayed(r.recording) == b"root# "  # the device prints no echo of exit


def test_a_full_disk_stops_the_recording_not_the_session(
        site: Site, logged: list[str]) -> None:
    recordings = site.hub.recordings
    assert recordings is not None
    recordings._open_sink = lambda path: FullDisk(room=200)
    chan = site.operator(b"alice:site-a", shell())
    for i in range(20):
        site.type(chan, b"line %d\r" % i)
        site.clock.advance(FLUSH_DELAY)  # a batch goes to the disk
        site.settle()
    # The disk filled up mid-session: said once, and the session went on.
    assert len([line for line in logged if "recording stopped" in line]) == 1
    assert not chan.is_closed
    site.type(chan, b"exit\r")
    assert chan.status == 0
    assert chan.out.count(b"ran line") == 20  # every keystroke and its output went through
    [row] = recordings.log.rows()
    assert row.truncated and row.exit_status == 0
    assert [line for line in logged if "recording stopped" in line] == [
        f"session {row.id} (alice on site-a): recording stopped, the session goes on "
        f"unrecorded: No space left on device writing {row.recording}"]


def test_a_web_terminal_session_is_recorded_as_the_browser_saw_it(site: Site) -> None:
    from test_web_terminal import open_terminal

    browser = open_terminal(site, size=(100, 30))
    browser.type(b"echo hello\r")
    browser.say(json.dumps({"resize": [132, 43]}))
    browser.type(b"exit\r")
    [row] = site.hub.recordings.log.rows()  # type: ignore[union-attr]
    assert (row.kind, row.source, row.exit_status) == ("web terminal", "192.0.2.30", 0)
    assert row.recording is not None
    assert replayed(row.recording) == browser.output
    lines = Path(row.recording).read_bytes().splitlines()
    head = json.loads(lines[0])
    assert (head["width"], head["height"], head["env"]["TERM"]) == (100, 30, "xterm-256color")
    assert [json.loads(line)[1:] for line in lines[1:] if b'"r"' in line] == [["r", "132x43"]]


def test_the_hub_makes_its_recordings_directory_unless_recording_is_off(
        tmp_path: Path) -> None:
    from hub.app.service import Options, makeService

    for data, extra in ((tmp_path / "on", ""), (tmp_path / "off", "enabled = false\n")):
        data.mkdir()
        (data / "callhomehub.toml").write_text(f"[recordings]\n{extra}")
        options = Options()
        options.parseOptions(["--data", str(data), "--ssh", "tcp:0:interface=127.0.0.1",
                              "--metrics", "none", "--web", "none", "--workers", "1"])
        top = makeService(options, reactor=MemoryReactorClock())
        hub = top.hub  # type: ignore[attr-defined]
        assert hub.gateway_needs().recordings is hub.recordings
        # Pruned at start and every PRUNE_INTERVAL on the hub's reactor.
        [pruner] = [s for s in top if isinstance(s, internet.TimerService)
                    and s.call[0] == hub.recordings.prune]
        assert pruner.step == PRUNE_INTERVAL == 3600
        hub.registry.close()
        top.services[0].stopService()  # the data directory's lock
    assert stat.S_IMODE(os.stat(tmp_path / "on" / "recordings").st_mode) == 0o700
    assert not (tmp_path / "off" / "recordings").exists()


def test_a_recording_waits_for_its_row_in_the_registry_thread(tmp_path: Path) -> None:
    """The sessions row is written in the registry thread: what the device prints
    before it exists waits (up to max_pending bytes), then goes to the file; a
    session that ended meanwhile is finished once the row is there."""
    from memory_hub import registry_thread, settle

    clock = MemoryReactorClock()
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    thread = registry_thread(tmp_path, clock)
    recordings = open_recordings(registry, str(tmp_path / "recordings"), clock, sync,
                                 RetentionRules(), calls=thread)
    early = recordings.begin("alice", "site-a", "192.0.2.1", "shell", (b"shell", b""), PTY)
    early.output(b"before the row\r\n")
    early.finish(3, 16)
    assert early.id is None  # the row's answer has not come back yet
    settle(thread)
    clock.advance(FLUSH_DELAY)
    settle(thread)
    [row] = recordings.log.rows()
    assert (row.id, row.bytes_from_device, row.truncated) == (early.id, 16, False)
    assert row.ended is not None and row.recording is not None
    lines = Path(row.recording).read_bytes().splitlines()
    assert json.loads(lines[0])["title"] == "alice on site-a"
    assert json.loads(lines[1])[1:] == ["o", "before the row\r\n"]

    recordings.max_pending = 200  # a registry slower than the device's output
    flood = recordings.begin("bob", "site-a", "192.0.2.2", "shell", (b"shell", b""), PTY)
    flood.output(b"z" * 1000)
    settle(thread)
    flood.finish(1, 1000)
    settle(thread)
    clock.advance(FLUSH_DELAY)
    settle(thread)
    row = recordings.log.get(flood.id)  # type: ignore[arg-type]
    assert row is not None and row.truncated
