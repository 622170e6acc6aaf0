"""What every benchmark program shares: clean exit on SIGTERM, sizes, the JSON document."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _stop(signum: int, frame: object) -> None:
    # SystemExit unwinds through the finally blocks that stop servers and clients.
    raise SystemExit(128 + signum)


def install_sigterm() -> None:
    """SIGTERM (and SIGHUP) stop the program the way Ctrl-C does: via `finally`."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)


def write_doc(path: Path, bench: str, body: dict[str, Any]) -> None:
    """One benchmark's JSON: which program, the exact command, when, then `body`."""
    doc = {"bench": bench, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **body}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank on the sorted values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def add_common_options(parser: Any) -> None:
    """--json, the quiet-machine wait and --hub-source, as every benchmark takes them."""
    parser.add_argument("--json", type=Path, help="write results and machine info here")
    parser.add_argument("--quiet-wait", type=float, default=20.0, metavar="S")
    parser.add_argument("--quiet-below", type=float, default=0.25, metavar="CORES")
    add_source_option(parser)


def add_source_option(parser: Any) -> None:
    parser.add_argument(
        "--hub-source", metavar="REV",
        help="run the hub (twistd, CLI) from git revision REV (exported with `git archive` "
             "to a temporary directory) instead of the work tree, e.g. while it is mid-edit")


def use_hub_source(rev: str | None, workdir: Path) -> dict[str, str]:
    """Export `rev` of the hub to `workdir` and put it first on every child's PYTHONPATH.

    The venv's editable install finds the work tree's package after PYTHONPATH,
    so twistd, the CLI and this process all import the export. The work tree's
    own twistd plugin would still be found (a .pth file puts the work tree on
    sys.path, and twistd keeps the last plugin of a name), so the export carries
    a `sitecustomize` that takes the work tree off sys.path in every child.
    Works for revisions before the move to `hub/` too (package `callhomehub`).
    Returns what to record: the revision and its commit, or "work tree".
    """
    if not rev:
        return {"hub_source": "work tree"}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    package = "hub" if subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}:hub"],
        capture_output=True).returncode == 0 else "callhomehub"
    tree = workdir / "hub-source"
    tree.mkdir()
    has_setup = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}:setup.py"],
                               capture_output=True).returncode == 0
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, package, "twisted",
                              *(["setup.py"] if has_setup else [])],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    if has_setup:
        # The revision's C extensions, as `pip install -e` builds them for the work
        # tree: without them the export would run their slower pure-Python twins.
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       cwd=tree, capture_output=True, check=False)
    (tree / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != {str(ROOT)!r}]\n")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["CALLHOMEHUB_BENCH_CLI"] = "hub.app.cli" if package == "hub" else "callhomehub.cli"
    sys.path.insert(0, str(tree))
    return {"hub_source": rev, "hub_commit": commit}
