"""How long one `/metrics` scrape takes with N nodes and N live tunnels (in memory).

    .venv/bin/python bench/metrics_scrape.py --nodes 10000 --repeat 20

Builds a registry of N nodes (one transaction) and N live tunnels of one forward
each (NodeTunnel objects with a stand-in listening port, no sockets), then times
`generate_latest` of the hub's metrics: once right after a registry change (the
node counts are read again) and, with nothing changed, the median of --repeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from memory_hub import make_hub, start_factory
from prometheus_client import generate_latest
from twisted.internet.testing import MemoryReactorClock

from hub.tunnel.forwards import Forward
from hub.tunnel.live import NodeTunnel, PortListener
from hub.web.metrics import metrics_registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        clock = MemoryReactorClock()
        hub = make_hub(Path(data), clock)
        with hub.registry.transaction() as db:
            db.executemany("INSERT INTO nodes (name, key_blob, fingerprint, state, created)"
                           " VALUES (?, ?, 'fp', ?, 0)",
                           [(f"node-{i}", f"key-{i}".encode(),
                             "approved" if i % 2 else "pending") for i in range(args.nodes)])
        sessions = hub.sessions
        for i in range(args.nodes):
            tunnel = NodeTunnel(sessions, f"node-{i}", conn=None, public=i % 10 == 0)
            forward = Forward("ssh", b"", 0, 50000 + i % 15000)
            tunnel.table.add(forward)
            tunnel.listeners[forward] = PortListener(port=object())
            sessions._live[f"node-{i}"] = tunnel
        metrics = metrics_registry(hub.registry, sessions, start_factory(hub), None)
        hub.registry.set_setting("bench", "changed", "bench")  # the counts are read again
        start = time.perf_counter()
        size = len(generate_latest(metrics))
        after_change = time.perf_counter() - start
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            generate_latest(metrics)
            times.append(time.perf_counter() - start)
        print(f"{args.nodes} nodes, {args.nodes} tunnels: scrape {size} bytes; "
              f"after a registry change {after_change * 1000:.1f} ms, "
              f"unchanged median {statistics.median(times) * 1000:.1f} ms "
              f"(max {max(times) * 1000:.1f} ms, {args.repeat} scrapes)")


if __name__ == "__main__":
    main()
