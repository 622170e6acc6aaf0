"""Recorded terminal sessions as asciicast v2, and how a recording is played back.

Pure rules: lines in, events out. The header is one JSON object (version 2,
width, height, timestamp, env TERM, title); each event after it is
`[seconds, code, data]`: "o" for what the operator's terminal was sent, "r"
for a window change ("COLSxROWS").

The format keeps text: terminal output is UTF-8 decoded incrementally (a
character split between two packets is written once whole) and bytes that
are not UTF-8 are kept as lone surrogates (`surrogateescape`), which JSON
writes as `\\udcXX`; encoding the events' text back gives the exact bytes the
operator's terminal received.
"""

from __future__ import annotations

import codecs
import json
import struct
from collections.abc import Iterable, Iterator

from attrs import frozen

OUTPUT = "o"
RESIZE = "r"


class CastError(ValueError):
    """A recording that is not asciicast v2."""


@frozen
class Event:
    time: float
    code: str
    data: str


def header(width: int, height: int, timestamp: int, term: str, title: str) -> bytes:
    return _line({"version": 2, "width": width, "height": height, "timestamp": timestamp,
                  "env": {"TERM": term}, "title": title})


def event(time: float, code: str, data: str) -> bytes:
    return _line([round(time, 6), code, data])


def _line(value: object) -> bytes:
    # ensure_ascii keeps lone surrogates (bytes that are not UTF-8) as \udcXX escapes.
    return json.dumps(value, ensure_ascii=True, separators=(", ", ": ")).encode() + b"\n"


def pty_size(pty_req: bytes) -> tuple[str, int, int]:
    """TERM, columns and rows of an SSH `pty-req` (80x24 when it gives none)."""
    try:
        (length,) = struct.unpack(">L", pty_req[:4])
        term = pty_req[4:4 + length].decode("ascii", "replace")
        cols, rows = struct.unpack(">2L", pty_req[4 + length:12 + length])
    except (struct.error, UnicodeDecodeError):
        return "", 80, 24
    return term, cols or 80, rows or 24


def window_size(window_change: bytes) -> tuple[int, int] | None:
    """Columns and rows of an SSH `window-change`, or None for a malformed one."""
    try:
        cols, rows = struct.unpack(">2L", window_change[:8])
    except struct.error:
        return None
    return cols, rows


class OutputText:
    """Terminal bytes to event text, one packet at a time, losslessly."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def feed(self, data: bytes | memoryview) -> str:
        return self._decoder.decode(data)

    def end(self) -> str:
        return self._decoder.decode(b"", final=True)


def output_bytes(text: str) -> bytes:
    """The bytes an "o" event's text stands for (the inverse of `OutputText`)."""
    return text.encode("utf-8", "surrogateescape")


def parse(lines: Iterable[bytes]) -> tuple[dict[str, object], Iterator[Event]]:
    """The header and the events of a recording; CastError if it is not asciicast v2.
    A last line cut short (the hub stopped mid-write) ends the events."""
    it = iter(lines)
    try:
        head = json.loads(next(it))
    except (StopIteration, ValueError):
        raise CastError("no asciicast header") from None
    if not isinstance(head, dict) or head.get("version") != 2:
        raise CastError("not an asciicast v2 recording")

    def events() -> Iterator[Event]:
        for line in it:
            try:
                t, code, data = json.loads(line)
            except ValueError:
                return
            yield Event(float(t), str(code), str(data))

    return head, events()


def pauses(events: Iterable[Event], speed: float, max_idle: float | None
           ) -> Iterator[tuple[float, Event]]:
    """Each event with the wait before it: the recorded gap divided by `speed`
    (0: no waiting), a gap first capped at `max_idle` recorded seconds."""
    last = 0.0
    for e in events:
        gap = max(0.0, e.time - last)
        last = e.time
        if max_idle is not None:
            gap = min(gap, max_idle)
        yield (gap / speed if speed > 0 else 0.0), e
