"""Server time per page of the web console's node list with 10,000 nodes.

    .venv/bin/python bench/web_list.py [--nodes 10000] [--runs 200]

Builds a registry with N nodes (each with two leases, a tenth online, an NSCA
result for every node), then renders pages through the real Site in memory
(raw HTTP over a StringTransport: routing, session check, queries, HTML) for an
admin (all nodes) and an operator whose grants allow half of them, and prints
the median and p99 per kind of page.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from hub.access.auth import hash_password
from hub.app.config import build_config
from hub.app.context import Hub
from hub.app.service import build_ssh_factory
from hub.ssh.keys import load_hub_keys
from hub.store.registry import Registry
from hub.tunnel.sessions import LiveSessions
from hub.web.sessions import COOKIE, SessionStore
from hub.web.site import console_site
from hub.web.weblinks import WebLinks


def fill(registry: Registry, n: int) -> None:
    now = time.time()
    with registry.transaction() as db:
        db.executemany(
            "INSERT INTO nodes (name, key_blob, fingerprint, state, created, last_seen, online)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(f"{'site' if i % 2 else 'lab'}-{i:05}", f"k{i}".encode(), f"fp{i}",
              ("approved", "pending", "revoked")[i % 3], now, now, int(i % 10 == 0))
             for i in range(n)])
        db.executemany("INSERT INTO leases (node_id, service, port) VALUES (?, ?, ?)",
                       [(i + 1, s, 10000 + 2 * i + k) for i in range(n)
                        for k, s in enumerate(("ssh", "http"))])
        db.executemany("INSERT INTO results (node, host, service, code, output, time, received)"
                       " VALUES (?, ?, 'load', ?, 'OK', ?, ?)",
                       [(f"{'site' if i % 2 else 'lab'}-{i:05}",
                         f"{'site' if i % 2 else 'lab'}-{i:05}", i % 4, now, now)
                        for i in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp())
    clock = MemoryReactorClock()
    config = build_config({"data": str(data), "web": "none"})
    registry = Registry(config.db_path, now=clock.seconds)
    fill(registry, args.nodes)
    registry.add_user("root", hash_password(b"pw", 4), [], [], "bench", admin=True)
    registry.add_user("alice", hash_password(b"pw", 4), [], ["site-*"], "bench")
    sessions = LiveSessions(registry, clock, clock, 49152, 65535, "0.0.0.0")
    hub = Hub(config, registry, load_hub_keys(config.keys_dir), clock,
              lambda f, *a: defer.maybeDeferred(f, *a), sessions, clock)
    factory = build_ssh_factory(hub)
    hub.weblinks = WebLinks(clock, None, True, lambda: 443)
    hub.web_sessions = SessionStore(clock)
    site = console_site(hub.web_needs(factory.password_budget, factory.backoff, True))
    from hub.rules.logins import OperatorLogin

    def cookie(name: str) -> str:
        user = registry.user(name)
        login = OperatorLogin(name, None, None, identity=user.identity,
                              credential=user.password_hash)
        return hub.web_sessions.start(login, "127.0.0.1").id  # type: ignore[union-attr]

    def get(path: str, session: str) -> float:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        proto = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        raw = (f"GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n"
               f"Cookie: {COOKIE.decode()}={session}\r\n\r\n").encode()
        started = time.perf_counter()
        proto.dataReceived(raw)
        took = time.perf_counter() - started
        assert transport.value().startswith(b"HTTP/1.1 200"), transport.value()[:200]
        return took

    root, alice = cookie("root"), cookie("alice")
    cases = [("admin, first page", "/nodes", root),
             ("admin, page 100", "/nodes?page=100", root),
             ("admin, search 'site-0' + state", "/nodes?q=site-0&state=approved", root),
             ("admin, JSON view", "/nodes.json?page=3", root),
             ("operator (grants site-*), page 50", "/nodes?page=50", alice),
             ("node page", "/nodes/site-00001", root),
             ("audit, first page", "/audit", root)]
    print(f"{args.nodes} nodes, {args.runs} requests each (server time, ms)")
    for label, path, session in cases:
        times = sorted(get(path, session) for _ in range(args.runs))
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        print(f"  {label:36} median {statistics.median(times) * 1000:6.2f}"
              f"  p99 {p99 * 1000:6.2f}")


if __name__ == "__main__":
    main()
