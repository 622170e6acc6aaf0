"""Fleet commands (`callhomehub run`): which nodes a run takes, and how each one ended.

A run takes every approved node whose name matches the pattern (case-insensitive,
like every node name); the nodes that are not online are reported as offline at
once, never waited for. Each node then ends in exactly one `Outcome`.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from attrs import frozen

OK = "ok"                # exit status 0
FAILED = "failed"        # ran, non-zero exit status (or killed by a signal)
OFFLINE = "offline"      # approved and matching, but no tunnel now
TIMEOUT = "timed out"    # login and command did not finish within --timeout
ERROR = "error"          # the hub could not run it: login refused, host key changed, ...
KINDS = (OK, FAILED, OFFLINE, TIMEOUT, ERROR)


@frozen
class Outcome:
    """How the command ended on one node."""

    node: str
    status: str
    exit: int | None = None
    stdout: str = ""
    stderr: str = ""
    message: str = ""    # why, for offline, timed out and error

    def as_json(self) -> dict[str, object]:
        return {"node": self.node, "status": self.status, "exit": self.exit,
                "stdout": self.stdout, "stderr": self.stderr, "message": self.message}

    @classmethod
    def from_json(cls, row: dict[str, object]) -> Outcome:
        exit_ = row.get("exit")
        return cls(node=str(row["node"]), status=str(row["status"]),
                   exit=exit_ if isinstance(exit_, int) else None,
                   stdout=str(row.get("stdout", "")), stderr=str(row.get("stderr", "")),
                   message=str(row.get("message", "")))


def finished(node: str, status: int, out: bytes, err: bytes) -> Outcome:
    return Outcome(node, OK if status == 0 else FAILED, status,
                   out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def select(pattern: str, nodes: Iterable[tuple[str, str, bool]]
           ) -> tuple[list[str], list[str]]:
    """(online, offline) names of the approved nodes matching `pattern`, each sorted.

    `nodes` are (name, state, online) triples.
    """
    glob = pattern.lower()
    online: list[str] = []
    offline: list[str] = []
    for name, state, live in nodes:
        if state == "approved" and fnmatchcase(name.lower(), glob):
            (online if live else offline).append(name)
    return sorted(online), sorted(offline)


def tally(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """How many nodes ended each way, every kind present (0 when none)."""
    counts = dict.fromkeys(KINDS, 0)
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return counts


def summary_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {counts.get(kind, 0)}" for kind in KINDS)
