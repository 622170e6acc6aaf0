"""`callhomehub sessions [--node N] [--user U] [--json]` and `callhomehub replay ID`.

`sessions` lists operators' device sessions from the registry. `replay` writes
a recording's output to stdout with its recorded timing divided by `--speed`
(0: at once), each pause first capped at `--max-idle` seconds when given. The
timing is kept whether or not stdout is a terminal (`replay ID | less -R`
shows it as it happened); `--speed 0` dumps it. The bytes written are the
bytes the operator's terminal was sent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from hub.app.stdio import print_table
from hub.errors import HubError
from hub.rules import asciicast
from hub.rules.display import iso_utc
from hub.store.registry import Registry
from hub.store.sessions import SessionLog, SessionRow


def add_parser(sub: Any, actor: Callable[[], str]) -> None:
    sp = sub.add_parser("sessions", help="operators' device sessions (gateway, chooser, "
                        "web terminal)")
    sp.set_defaults(func=cmd_sessions)
    sp.add_argument("--node", metavar="N", help="only sessions on node N")
    sp.add_argument("--user", metavar="U", help="only operator U's sessions")
    sp.add_argument("--json", action="store_true", help="print JSON")
    rp = sub.add_parser("replay", help="write a recorded session's output to stdout, "
                        "with its timing")
    rp.set_defaults(func=cmd_replay)
    rp.add_argument("id", type=int, help="the session's id (callhomehub sessions)")
    rp.add_argument("--speed", type=float, default=1.0, metavar="N",
                    help="N times faster (default 1: real time; 0: no waiting)")
    rp.add_argument("--max-idle", type=float, default=None, metavar="S",
                    help="cap every pause at S recorded seconds")


def session_json(row: SessionRow) -> dict[str, Any]:
    return {"id": row.id, "node": row.node, "user": row.user, "start": iso_utc(row.started),
            "end": iso_utc(row.ended), "exit": row.exit_status, "signal": row.exit_signal,
            "source": row.source, "kind": row.kind, "command": row.command,
            "recording": row.recording, "truncated": row.truncated,
            "bytes": {"to_device": row.bytes_to_device,
                      "from_device": row.bytes_from_device}}


def cmd_sessions(reg: Registry, args: argparse.Namespace) -> int:
    rows = SessionLog(reg).rows(args.node, args.user)
    if args.json:
        print(json.dumps([session_json(r) for r in rows], indent=2))
        return 0
    table = [["ID", "NODE", "USER", "KIND", "SOURCE", "START", "END", "EXIT", "BYTES",
              "RECORDING"]]
    for r in rows:
        ended = "-" if r.exit_status is None and r.exit_signal is None else (
            str(r.exit_status) if r.exit_status is not None else f"signal {r.exit_signal}")
        recording = ("-" if r.recording is None
                     else r.recording + (" (truncated)" if r.truncated else ""))
        table.append([str(r.id), r.node, r.user, r.kind + (f": {r.command}" if r.command else ""),
                      r.source, iso_utc(r.started) or "-", iso_utc(r.ended) or "-", ended,
                      f"{r.bytes_to_device}/{r.bytes_from_device}", recording])
    print_table(table)
    return 0


def play(lines: Iterable[bytes], out: BinaryIO, speed: float, max_idle: float | None,
         sleep: Callable[[float], object] = time.sleep) -> int:
    """Write the output events of a recording to `out` with their timing; the bytes."""
    _header, events = asciicast.parse(lines)
    written = 0
    for pause, event in asciicast.pauses(events, speed, max_idle):
        if event.code != asciicast.OUTPUT:
            continue  # a window change: nothing for the terminal
        if pause > 0:
            sleep(pause)
        data = asciicast.output_bytes(event.data)
        out.write(data)
        out.flush()
        written += len(data)
    return written


def cmd_replay(reg: Registry, args: argparse.Namespace) -> int:
    if args.speed < 0:
        raise HubError("replay: --speed must be 0 or more")
    if args.max_idle is not None and args.max_idle < 0:
        raise HubError("replay: --max-idle must be 0 or more")
    row = SessionLog(reg).get(args.id)
    if row is None:
        raise HubError(f"replay: no session {args.id}")
    if row.recording is None:
        raise HubError(f"replay: session {args.id} ({row.kind} on {row.node}) has no "
                       "recording (no pty, recording off, or removed by retention)")
    try:
        with open(row.recording, "rb") as f:
            play(f, sys.stdout.buffer, args.speed, args.max_idle)
    except asciicast.CastError as e:
        raise HubError(f"replay: {row.recording}: {e}") from None
    except BrokenPipeError:
        return 0
    if row.truncated:
        print(f"callhomehub: the recording of session {args.id} stopped early "
              "(see the hub's log)", file=sys.stderr)
    return 0
