"""Registry operations per second on SQLite and on PostgreSQL, in one run.

    .venv/bin/python bench/registry_ops.py [--nodes 1000] [--repeat 3] [--postgres URL]

Each engine gets a fresh registry; the same operations run on both, each as the
hub calls it (one transaction per write), one after the other over `--nodes`
nodes: `register` (a new node), `lease` (a new port lease per node),
`mark_online`/`mark_offline`, `mark_online` again as the registry thread writes
queued writes (in batches of 20, a savepoint each; --nodes a multiple of 20),
`node_by_key` (the device login's lookup), `audit`
(one entry), and `nodes()` (all nodes with their leases, as the hub reads after a
change). Engines alternate for every operation and repeat (the order flipping),
each measurement after waiting (up to 5 s) for a quiet machine; the median of `--repeat` is
printed. PostgreSQL is a throwaway local cluster (tests/postgres.py: loopback
TCP, fsync off as in the tests) unless `--postgres` names an empty database.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import wait_quiet

from hub.store.registry import Registry

Op = Callable[[Registry, int, int], object]  # (registry, repeat, node index)


def name(r: int, i: int) -> str:
    return f"node-{r}-{i:05d}"


# Writes per transaction when the registry thread runs queued writes as one batch
# (`Registry.batch`, hub.store.offthread), as in "mark_online, batched".
BATCH = 20


def online_batched(reg: Registry, r: int, i: int) -> None:
    """`mark_online` as the registry thread runs queued writes: every BATCH-th call
    writes the next BATCH nodes in one transaction, a savepoint each."""
    if i % BATCH == 0:
        with reg.batch():
            for j in range(i, i + BATCH):
                reg.mark_online(name(r, j), "192.0.2.2")


OPS: dict[str, Op] = {
    "register": lambda reg, r, i: reg.register(name(r, i), name(r, i).encode(), "fp", "b"),
    "lease": lambda reg, r, i: reg.lease(name(r, i), "ssh", 20000, 60000),
    "mark_online": lambda reg, r, i: reg.mark_online(name(r, i), "192.0.2.1"),
    f"mark_online, batched by {BATCH}": online_batched,
    "mark_offline": lambda reg, r, i: reg.mark_offline(name(r, i)),
    "node_by_key": lambda reg, r, i: reg.node_by_key(name(r, i).encode()),
    "audit": lambda reg, r, i: reg.audit("bench", "bench", name(r, i), "x"),
    "nodes()": lambda reg, r, i: reg.nodes(),
}


def rate(reg: Registry, op: Op, r: int, count: int) -> float:
    """Calls per second of `op` over nodes 0..count-1 of repeat `r`."""
    start = time.perf_counter()
    for i in range(count):
        op(reg, r, i)
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", metavar="URL", help="an empty database to use")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    # Killed with SIGTERM (timeout(1)), the throwaway cluster is still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cluster = None
    url = args.postgres
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if url is None:
                from postgres import Cluster

                cluster = Cluster()
                cluster.start()
                url = cluster.database()
            engines = {"sqlite": Registry(str(Path(tmp) / "hub.sqlite3"), now=time.time),
                       "postgresql": Registry(url, now=time.time)}
            figures: dict[str, dict[str, list[float]]] = {e: {} for e in engines}
            for r in range(args.repeat):
                order = list(engines) if r % 2 == 0 else list(engines)[::-1]
                for op_name, op in OPS.items():
                    # nodes() reads every node (nodes x repeats so far): fewer calls.
                    count = 20 if op_name == "nodes()" else args.nodes
                    for engine in order:
                        wait_quiet(0.25, 5)
                        figures[engine].setdefault(op_name, []).append(
                            rate(engines[engine], op, r, count))
            for reg in engines.values():
                reg.close()
        finally:
            if cluster is not None:
                cluster.stop()
    median = {e: {op: statistics.median(v) for op, v in f.items()} for e, f in figures.items()}
    print(f"{args.nodes} nodes per repeat, median of {args.repeat}; nodes() lists "
          f"{args.nodes}..{args.nodes * args.repeat} nodes")
    width = max(len(op) for op in OPS)
    print(f"{'operation':<{width}} {'SQLite ops/s':>13} {'PostgreSQL ops/s':>17} {'SQLite/PG':>10}")
    for op, value in median["sqlite"].items():
        pg = median["postgresql"][op]
        print(f"{op:<{width}} {value:>13,.0f} {pg:>17,.0f} {value / pg:>9.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"nodes": args.nodes, "figures": figures},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
