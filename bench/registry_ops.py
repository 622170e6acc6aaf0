"""Registry operations per second on SQLite and on PostgreSQL, in one run.

    .venv/bin/python bench/registry_ops.py [--nodes 1000] [--postgres URL] [--json FILE]

Each engine gets a fresh registry with `--nodes` registered nodes, then the same
operations run one after the other, each as the hub calls it (one transaction per
write): `lease` (a new port lease per node), `mark_online`/`mark_offline` (each
node in turn), `node_by_key` (the device login's lookup), `audit` (one entry),
and `nodes()` (all nodes with their leases, as the hub reads after a change).
PostgreSQL is a throwaway local cluster (tests/postgres.py: loopback TCP, fsync
off as in the tests) unless `--postgres` names a database to use (its tables are
created; use an empty database). Prints ops/s per engine and SQLite/PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hub.store.registry import Registry


def rate(count: int, run: Callable[[int], object]) -> float:
    """Calls per second of run(0..count-1)."""
    start = time.perf_counter()
    for i in range(count):
        run(i)
    return count / (time.perf_counter() - start)


def measure(target: str, nodes: int) -> dict[str, float]:
    reg = Registry(target, now=time.time)
    names = [f"node-{i:05d}" for i in range(nodes)]
    keys = [f"key-{i}".encode() for i in range(nodes)]
    results = {"register": rate(nodes, lambda i: reg.register(names[i], keys[i], "fp", "bench"))}
    results["lease"] = rate(nodes, lambda i: reg.lease(names[i], "ssh", 20000, 60000))
    results["mark_online"] = rate(nodes, lambda i: reg.mark_online(names[i], "192.0.2.1"))
    results["mark_offline"] = rate(nodes, lambda i: reg.mark_offline(names[i]))
    results["node_by_key"] = rate(nodes, lambda i: reg.node_by_key(keys[i]))
    results["audit"] = rate(nodes, lambda i: reg.audit("bench", "bench", names[i], "x"))
    results[f"nodes() of {nodes}"] = rate(max(5, 20_000 // nodes), lambda i: reg.nodes())
    reg.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--postgres", metavar="URL", help="an empty database to use")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = measure(str(Path(tmp) / "hub.sqlite3"), args.nodes)
    cluster = None
    url = args.postgres
    if url is None:
        from postgres import Cluster

        cluster = Cluster()
        cluster.start()
        url = cluster.database()
    try:
        postgres = measure(url, args.nodes)
    finally:
        if cluster is not None:
            cluster.stop()
    print(f"{'operation':<18} {'SQLite ops/s':>13} {'PostgreSQL ops/s':>17} {'SQLite/PG':>10}")
    for op, value in sqlite.items():
        print(f"{op:<18} {value:>13,.0f} {postgres[op]:>17,.0f} {value / postgres[op]:>9.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"nodes": args.nodes, "sqlite": sqlite,
                                               "postgresql": postgres}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
