"""What another hub's heartbeat costs a hub with N nodes: the change check, and the node
list read it used to trigger.

    .venv/bin/python bench/cluster_changes.py [--nodes N] [--beats B]

Two registries on one file in a temporary directory, hub-a and hub-b, N nodes each with one
lease. Hub B writes B heartbeats; after each, hub A does what its 0.25 s poll does first
(`Registry.changed`), and reads the node list when that says so (as `LiveSessions.enforce`
and the relayed ports do). Then the same with an `approve` by hub B in place of the
heartbeat, which must be noticed. Then hub B marks nodes online one at a time, as a storm
does, and hub A reads each change the way it does now (`NodeMirror`: only the nodes stamped
since its last read) and, for comparison, the whole list. Prints the mean times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hub.store.registry import Registry
from hub.store.revisions import NodeMirror


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10000)
    p.add_argument("--beats", type=int, default=200)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="callhomehub-changes-") as tmp:
        path = str(Path(tmp) / "hub.sqlite3")
        a, b = Registry(path, now=time.time), Registry(path, now=time.time)
        a.hub_id, b.hub_id = "hub-a", "hub-b"
        b.hub_started("hub-b", "127.0.0.1:4100", "ssh-ed25519 AAAA")
        with a.transaction() as db:
            db.executemany("INSERT INTO nodes (name, fingerprint, key_blob, state, created)"
                           " VALUES (?, ?, ?, 'approved', 0)",
                           [(f"n{i:05}", f"fp{i}", f"k{i}".encode()) for i in range(args.nodes)])
            db.execute("INSERT INTO leases (node_id, service, port, active)"
                       " SELECT id, 'ssh', 20000 + id, 1 FROM nodes")
        a.changed()
        start = time.perf_counter()
        nodes = a.nodes()
        read = time.perf_counter() - start
        reads = 0
        start = time.perf_counter()
        for _ in range(args.beats):
            b.hub_heartbeat("hub-b")
            if a.changed():
                reads += 1
                a.nodes()
        per_beat = (time.perf_counter() - start) / args.beats
        b.set_state("n00000", "revoked", "bench")
        noticed = a.changed()
        print(f"{len(nodes)} nodes: one node list read {read * 1e3:.1f} ms; "
              f"{args.beats} heartbeats of another hub: {reads} reads, "
              f"{per_beat * 1e6:.0f} us each (write + check); "
              f"a revoke noticed: {noticed}")
        mirror = NodeMirror()
        mirror.nodes(a)
        a.changed()
        changes = whole = 0.0
        for i in range(1, args.beats + 1):
            b.mark_online(f"n{i:05}", "192.0.2.1")
            assert a.changed()
            start = time.perf_counter()
            seen = mirror.nodes(a)
            changes += time.perf_counter() - start
            start = time.perf_counter()
            assert {n.name: n.online for n in a.nodes()} == {n.name: n.online for n in seen}
            whole += time.perf_counter() - start
        print(f"{args.beats} nodes coming online on another hub, one change each: reading the "
              f"changed nodes {changes / args.beats * 1e6:.0f} us per change (the mirror's "
              f"{mirror.full_reads} whole read at start aside), the whole list "
              f"{whole / args.beats * 1e3:.1f} ms")
        a.close()
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
