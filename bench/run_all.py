"""Every benchmark in one go: one JSON, and the plots for docs/.

    .venv/bin/python bench/run_all.py [--quick | --full] [--json bench/results/all.json]
                                      [--plots docs/perf] [--only nsca,gateway,...]

Runs each program as a subprocess with its own `--json` (so one can also be
re-run alone), in this order: nsca, gateway, tunnels at several N (the curve
for the plots), throughput, connect. Sizes:

| size      | throughput  | nsca        | gateway          | tunnels N           | connect |
|-----------|-------------|-------------|------------------|---------------------|---------|
| --quick   | --quick     | --quick     | --quick          | 100                 | 100 x 1 |
| (default) | 256 MiB x 1 | 4 x 5000 x5 | 2000 rt, 128 MiB | 300, 1000, 3000     | 500 x 3 |
| --full    | 256 MiB x 3 | --full      | --full           | 1000, 3000, 10000 ¹ | 500 x 5 |

¹ an N whose tunnels need more descriptors than the open-file limit allows one
process (2 per tunnel) runs with `--port-keeper`, as 10,000 does here (limit 20,000).

The default takes some minutes (mostly waiting for a quiet machine); --full
is up to half an hour. Then `plots.py` draws docs/perf/*.png from the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script: bench/ is on sys.path.
from common import machine_info
from peers import nofile_limit
from plots import render
from runner import add_source_option, install_sigterm, use_hub_source, write_doc

HERE = Path(__file__).resolve().parent
BENCHES = ("nsca", "gateway", "tunnels", "throughput", "connect")
TUNNEL_N = {"quick": "100", "default": "300,1000,3000", "full": "1000,3000,10000"}


def size_of(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def commands(args: argparse.Namespace, results: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of every run, each writing results/<name>.json."""
    size = size_of(args)
    flag = {"quick": ["--quick"], "full": ["--full"], "default": []}[size]
    source = ["--hub-source", args.hub_source] if args.hub_source else []
    runs: list[tuple[str, list[str]]] = []
    if "nsca" in args.only:
        extra = ["--results", "5000", "--repeat", "5"] if size == "default" else []
        runs.append(("nsca", ["nsca.py", *flag, *extra, *source]))
    if "gateway" in args.only:
        runs.append(("gateway", ["gateway.py", *flag, *source]))
    if "tunnels" in args.only:
        sshd_done: set[int] = set()
        for n in (args.tunnel_n or TUNNEL_N[size]).split(","):
            # sshd once per size: min(N, --sshd-max) repeats for every larger N.
            m = min(int(n), args.sshd_max)
            # Two descriptors per tunnel in one process: past the open-file limit the
            # hub runs with its port keeper (listeners in a helper process).
            keeper = ["--port-keeper"] if 2 * int(n) + 64 > nofile_limit() else []
            runs.append((f"tunnels-{n}", ["tunnels.py", "--n", n, "--sshd-max",
                                          "0" if m in sshd_done else str(m), *keeper,
                                          *source]))
            sshd_done.add(m)
    if "throughput" in args.only:
        extra = {"quick": ["--quick"], "full": ["--repeat", "3"], "default": []}[size]
        runs.append(("throughput", ["throughput.py", *extra, *source]))
    if "connect" in args.only:
        extra = {"quick": ["--connections", "100", "--repeat", "1"], "full": ["--repeat", "5"],
                 "default": []}[size]
        runs.append(("connect", ["connect.py", *extra]))
    return [(name, [sys.executable, str(HERE / argv[0]), *argv[1:], "--json",
                    str(results / f"{name}.json")]) for name, argv in runs]


def run_one(name: str, argv: list[str], log: Path) -> dict[str, Any]:
    """Run one program; its exit status, wall time and JSON (None if it wrote none)."""
    print(f"== {name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    target = Path(argv[argv.index("--json") + 1])
    target.unlink(missing_ok=True)
    start = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=out)
        try:
            stdout, _ = proc.communicate()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
    sys.stdout.write(f"== {name}\n{stdout.decode(errors='replace')}\n")
    sys.stdout.flush()
    # A run that found a shortfall exits 1 but still wrote its figures.
    doc = json.loads(target.read_text()) if target.exists() else None
    return {"exit": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "command": " ".join(Path(a).name if a == sys.executable else a for a in argv),
            "doc": doc}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated: %(default)s")
    p.add_argument("--tunnel-n", help="comma-separated N for the tunnel curve")
    p.add_argument("--sshd-max", type=int, default=500)
    p.add_argument("--json", type=Path, default=HERE / "results" / "all.json")
    p.add_argument("--plots", type=Path, default=HERE.parent / "docs" / "perf")
    p.add_argument("--no-plots", dest="plots", action="store_const", const=None)
    add_source_option(p)
    args = p.parse_args(argv)
    args.only = [b for b in args.only.split(",") if b]
    if not set(args.only) <= set(BENCHES):
        p.error(f"--only takes {', '.join(BENCHES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    results = args.json.parent
    results.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="callhomehub-runall-") as tmp:
        # Exported once here to pin the commit each program then exports.
        source = use_hub_source(args.hub_source, Path(tmp))
        # One commit for every program, even if the branch moves meanwhile.
        args.hub_source = source.get("hub_commit", args.hub_source)
        for name, argv_ in commands(args, results):
            runs[name] = run_one(name, argv_, results / "run_all.log")
    write_doc(args.json, "all", {
        "size": size_of(args), "machine": machine_info(), **source,
        "runs": {k: {key: v for key, v in r.items() if key != "doc"} for k, r in runs.items()},
        "benches": {k: r["doc"] for k, r in runs.items()}})
    if args.plots is not None:
        for path in render(json.loads(args.json.read_text()), args.plots):
            print(f"plot: {path}", file=sys.stderr)
    failed = [k for k, r in runs.items() if r["exit"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
