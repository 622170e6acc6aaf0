"""`callhomehub run [--nodes GLOB] [--parallel N] [--timeout S] -- COMMAND…`.

The running hub carries the command out (it holds the tunnels and the management
key); this prints what it reports: a progress line on a terminal, each node's
output and exit status as it ends, and a summary. Exit status 0 when every
matching node ran the command with status 0, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from hub.errors import HubError
from hub.rules.fleet import OK, Outcome, summary_line, tally
from hub.store.registry import Registry


def add_parser(sub: Any, actor: Callable[[], str]) -> None:
    sp = sub.add_parser("run", help="run a command on every approved online node that "
                        "matches, over the management login")
    sp.set_defaults(func=lambda reg, args: cmd_run(reg, args, actor()))
    sp.add_argument("--nodes", default="*", metavar="GLOB",
                    help="node name pattern (default: every approved node)")
    sp.add_argument("--parallel", type=int, default=10, metavar="N",
                    help="nodes at once (default 10)")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S",
                    help="seconds for login and command on each node (default 60)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("command", nargs="+", help="the command (after --), run by the "
                    "device user's shell like ssh's")


class Progress:
    """What the hub reported so far; prints each node as it ends."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.total = 0
        self.outcomes: list[Outcome] = []
        self.live = sys.stderr.isatty() and not as_json

    def __call__(self, line: dict[str, Any]) -> None:
        if "plan" in line:
            self.total = int(line["plan"]["nodes"])
        elif "outcome" in line:
            outcome = Outcome.from_json(line["outcome"])
            self.outcomes.append(outcome)
            if not self.as_json:
                self._clear()
                show(outcome)
            self._draw()

    def _draw(self) -> None:
        if self.live:
            done = len(self.outcomes)
            print(f"\r[{done}/{self.total}] {summary_line(tally(self.outcomes))}",
                  end="", file=sys.stderr, flush=True)

    def _clear(self) -> None:
        if self.live:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def show(outcome: Outcome) -> None:
    how = f"exit {outcome.exit}" if outcome.exit is not None else outcome.message
    print(f"== {outcome.node}: {outcome.status} ({how})")
    if outcome.stdout:
        print(outcome.stdout, end="" if outcome.stdout.endswith("\n") else "\n")
    for line in outcome.stderr.splitlines():
        print(f"stderr: {line}")
    sys.stdout.flush()


def cmd_run(reg: Registry, args: argparse.Namespace, actor: str) -> int:
    from hub.app.control import MAX_PARALLEL, MAX_RUN_TIMEOUT, ask

    if not 1 <= args.parallel <= MAX_PARALLEL:
        raise HubError(f"run: --parallel must be 1-{MAX_PARALLEL}")
    if not 0 < args.timeout <= MAX_RUN_TIMEOUT:
        raise HubError(f"run: --timeout must be more than 0 and at most {MAX_RUN_TIMEOUT:g} s")
    command = " ".join(args.command)  # as ssh joins its command words
    progress = Progress(args.json)
    answer = ask(args.data, {"op": "run", "nodes": args.nodes, "command": command,
                             "parallel": args.parallel, "timeout": args.timeout,
                             "actor": actor}, timeout=args.timeout + 30, progress=progress)
    progress._clear()
    if answer is None:
        raise HubError("run: the hub is not running (it reaches nodes through their tunnels)")
    if not answer["ok"]:
        raise HubError(answer["message"])
    if not progress.outcomes:
        raise HubError(f"run: no approved node matches {args.nodes!r}")
    if args.json:
        rows = sorted(progress.outcomes, key=lambda o: o.node)
        print(json.dumps([o.as_json() for o in rows], indent=2))
    else:
        print(answer["message"])
    return 0 if all(o.status == OK for o in progress.outcomes) else 1
