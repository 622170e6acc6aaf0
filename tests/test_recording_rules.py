"""Session recording, the pure parts: asciicast lines, lossless output text, replay
timing, and which recordings the retention rules delete."""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path

import pytest

from hub.app.sessions import play
from hub.rules import asciicast
from hub.rules.retention import Kept, RetentionRules
from hub.store.registry import Registry
from hub.store.sessions import SessionLog


def test_header_and_events_are_asciicast_v2() -> None:
    head = json.loads(asciicast.header(120, 40, 1764640000, "xterm", "alice on site-a"))
    assert head == {"version": 2, "width": 120, "height": 40, "timestamp": 1764640000,
                    "env": {"TERM": "xterm"}, "title": "alice on site-a"}
    assert json.loads(asciicast.event(1.5, "o", "ls\r\n")) == [1.5, "o", "ls\r\n"]
    assert json.loads(asciicast.event(2.0, "r", "100x30")) == [2.0, "r", "100x30"]
    assert asciicast.event(0.1234567, "o", "x").endswith(b"\n")


def test_pty_and_window_sizes() -> None:
    pty = struct.pack(">L", 5) + b"xterm" + struct.pack(">4L", 132, 43, 0, 0) + b"\0\0\0\0"
    assert asciicast.pty_size(pty) == ("xterm", 132, 43)
    assert asciicast.pty_size(b"\0\0") == ("", 80, 24)
    assert asciicast.window_size(struct.pack(">4L", 90, 30, 0, 0)) == (90, 30)
    assert asciicast.window_size(b"\0\0\0") is None


def test_output_text_gives_back_the_exact_bytes_whatever_the_split() -> None:
    rng = random.Random(7)
    data = ("héllo wörld ✓ 日本 " * 50).encode() + bytes(rng.randrange(256) for _ in range(4000))
    for _ in range(20):
        text = asciicast.OutputText()
        lines, i = [], 0
        while i < len(data):
            n = rng.randrange(1, 40)
            piece = text.feed(memoryview(data)[i:i + n])
            if piece:
                lines.append(asciicast.event(0.0, "o", piece))
            i += n
        lines.append(asciicast.event(0.0, "o", text.end()))
        back = b"".join(asciicast.output_bytes(json.loads(line)[2]) for line in lines)
        assert back == data


def test_a_character_split_across_packets_is_written_whole() -> None:
    text = asciicast.OutputText()
    check = "✓".encode()
    assert text.feed(b"ok " + check[:1]) == "ok "
    assert text.feed(check[1:]) == "✓"


def cast(*events: tuple[float, str, str]) -> list[bytes]:
    return [asciicast.header(80, 24, 0, "xterm", "t"),
            *(asciicast.event(t, c, d) for t, c, d in events)]


def test_replay_divides_the_recorded_pauses_by_the_speed() -> None:
    slept: list[float] = []
    out = io.BytesIO()
    lines = cast((0.5, "o", "a"), (2.5, "o", "b"), (2.5, "r", "90x30"), (12.5, "o", "c\udcff"))
    assert play(lines, out, 2.0, None, slept.append) == 4
    assert out.getvalue() == b"abc\xff"
    assert slept == [0.25, 1.0, 5.0]


def test_replay_caps_idle_pauses_and_speed_zero_never_waits() -> None:
    slept: list[float] = []
    lines = cast((0.5, "o", "a"), (30.5, "o", "b"))
    play(lines, io.BytesIO(), 1.0, 2.0, slept.append)
    assert slept == [0.5, 2.0]
    slept.clear()
    play(lines, io.BytesIO(), 0.0, None, slept.append)
    assert slept == []


def test_replay_refuses_what_is_not_a_recording_and_stops_at_a_cut_line() -> None:
    with pytest.raises(asciicast.CastError):
        play([b"hello\n"], io.BytesIO(), 1.0, None)
    with pytest.raises(asciicast.CastError):
        play([b'{"version": 1}\n'], io.BytesIO(), 1.0, None)
    out = io.BytesIO()
    play([*cast((0.0, "o", "whole")), b'[0.1, "o", "cut'], out, 0.0, None)
    assert out.getvalue() == b"whole"


DAY = 86400.0
MB = 1024 * 1024


def test_retention_removes_the_old_then_the_oldest_over_the_size() -> None:
    rules = RetentionRules(max_age_days=30, max_total_mb=10)
    now = 100 * DAY
    kept = [Kept(1, now - 40 * DAY, MB), Kept(2, now - 20 * DAY, 6 * MB),
            Kept(3, now - 10 * DAY, 3 * MB), Kept(4, now - 1 * DAY, 4 * MB)]
    assert [(k.id, why) for k, why in rules.prune(kept, now)] == [
        (1, "older than 30 days"), (2, "total over 10 MB")]
    # Within both limits nothing goes.
    assert rules.prune(kept[2:], now) == []


def test_retention_never_removes_a_recording_being_written() -> None:
    rules = RetentionRules(max_age_days=1, max_total_mb=1)
    kept = [Kept(1, 0.0, 5 * MB), Kept(2, 0.0, 5 * MB)]
    assert [k.id for k, _ in rules.prune(kept, 10 * DAY, live={1})] == [2]



def test_session_log_rows_and_filters(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    log = SessionLog(reg)
    a = log.begin("alice", "site-a", "192.0.2.1", "shell", 10.0,
                  recording=lambda i: f"/r/{i}.cast")
    b = log.begin("bob", "Site-B", "192.0.2.2", "exec", 20.0, "uptime")
    log.finish(a, 15.0, 0, None, 3, 400, 999, False)
    log.finish(b, 21.0, None, "KILL", 5, 6, 0, False)
    log.mark_truncated(a)
    assert [r.id for r in log.rows()] == [a, b]
    assert [r.id for r in log.rows(node="site-b")] == [b]  # node names are case-insensitive
    assert [r.id for r in log.rows(user="alice")] == [a]
    row = log.get(a)
    assert row is not None
    assert (row.recording, row.ended, row.exit_status, row.truncated) == (
        f"/r/{a}.cast", 15.0, 0, True)
    assert [(k.id, p) for k, p in log.recorded()] == [(a, f"/r/{a}.cast")]
    log.forget_recording(a)
    assert log.recorded() == []
    assert log.get(a).recording is None  # type: ignore[union-attr]
