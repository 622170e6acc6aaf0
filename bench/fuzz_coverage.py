"""A longer coverage-guided fuzz run (atheris) of the targets in tests/fuzz_coverage.py.

    .venv/bin/python bench/fuzz_coverage.py [--seconds S] [--only NAME ...] [--jobs J]
                                            [--keep DIR]

Every target gets an equal share of S seconds (default 300), J at a time (default 1),
each in a process of its own starting from its seed corpus; the corpus it grows and any
crash-* input are kept in DIR (default a temporary directory, removed at the end unless
something crashed). Prints, per target, the inputs run, libFuzzer's coverage features
and edges, and the crashes with libFuzzer's report; exits 1 if any crashed. Replay a
crash with `python tests/fuzz_coverage.py TARGET CRASH-FILE`; each one belongs in a
regression test (tests/test_fuzz_*.py). All in memory, nothing listens on a socket.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_coverage import TARGETS, Run, run_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="total time, shared equally by the targets (default 300)")
    parser.add_argument("--only", nargs="*", default=None, help="target names to run")
    parser.add_argument("--jobs", type=int, default=1, help="targets at a time (default 1)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep corpora and crashes here (default: a temporary directory)")
    args = parser.parse_args()
    names = args.only or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="fuzz-coverage-"))
    work.mkdir(parents=True, exist_ok=True)
    share = args.seconds * args.jobs / len(names)

    def one(name: str) -> Run:
        return run_target(name, share, work, timeout=share + 300)

    print(f"{'target':24} {'inputs':>9} {'features':>9} {'edges':>7} {'crashes':>8}", flush=True)
    runs: list[Run] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(one, names):
            runs.append(run)
            print(f"{run.target:24} {run.executions:>9} {run.features:>9} {run.edges:>7} "
                  f"{run.crashes:>8}", flush=True)
            if run.crashes or run.returncode:
                print(f"--- {run.target} (exit {run.returncode}):\n{run.output[-4000:]}",
                      file=sys.stderr)
    print(f"{'total':24} {sum(r.executions for r in runs):>9} "
          f"{sum(r.features for r in runs):>9} {sum(r.edges for r in runs):>7} "
          f"{sum(r.crashes for r in runs):>8}")
    failed = any(r.crashes or r.returncode for r in runs)
    if failed or args.keep:
        print(f"corpora and crashes in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
