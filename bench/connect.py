"""Short connections through a per-device port: hub, hub --port-keeper, sshd.

    .venv/bin/python bench/connect.py [--connections N] [--repeat R] [--json FILE]
        [--servers hub,hub-2w,hub+keeper,sshd] [--baseline REV] [--profile DIR] [--perf DIR]

Each server gets the same `ssh -N -R 0:127.0.0.1:ECHO` device (one tunnel,
chacha20-poly1305, OpenSSH's default); ECHO is a loopback server in this
process that answers one byte and closes. A client here then makes N
connections, one after another, through the port the server allocated:
connect, send one byte, read the answer, close. That is the cost of a new
forwarded connection (HTTP requests to a device's web UI, monitoring polls):
accept, channel open round trip through the tunnel, first byte each way,
teardown. With `--port-keeper` the hub's listener sits in a helper process
that passes each accepted connection over a UNIX socket; the run shows what
that hop costs. `hub-2w` is the hub with `--workers 2`: the device's tunnel
sits on one worker and the port's listener with it, so a second worker adds
nothing for one device (it shows what the worker layout costs). `--baseline
REV` adds `hub@REV` (and `hub-2w@REV` with hub-2w): the hub as of git
revision REV, run in the same alternation, for before/after figures under
the same load. Servers alternate in blocks (order flipped every repeat). `--profile DIR` records
every hub process with py-spy during its blocks (bench/stacks.py summarizes); `--perf DIR`
with Linux `perf record -g` instead (CPU time only: `perf report -i FILE --sort dso,sym`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import (
    Hub,
    PySpy,
    ThrowawaySSHD,
    Tunnel,
    machine_info,
    make_key,
    tree_cpu,
    wait_quiet,
)
from perfrecord import PerfRecord

CIPHER = "chacha20-poly1305@openssh.com"


class Echo:
    """Answers each connection's first byte, then closes it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(1)
                if data:
                    conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def one(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError(f"no answer through port {port}")
    return time.perf_counter() - start


def block(port: int, n: int) -> list[float]:
    return [one(port) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--connections", type=int, default=500, help="per block (default 500)")
    p.add_argument("--repeat", type=int, default=3, help="blocks per server (default 3)")
    p.add_argument("--servers", default="hub,hub+keeper,sshd")
    p.add_argument("--json", type=Path)
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="S")
    p.add_argument("--port-range", metavar="LOW-HIGH",
                   help="the hubs' per-device ports (default: the bench's usual range; "
                   "another bench holding thousands of ports there makes the forward fail)")
    p.add_argument("--baseline", metavar="REV",
                   help="also run the hub as of git revision REV (hub@REV)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy every hub process during its blocks into DIR")
    p.add_argument("--perf", type=Path, metavar="DIR",
                   help="`perf record -g` every hub process during its blocks into DIR")
    args = p.parse_args(argv)
    names = [n for n in args.servers.split(",") if n]
    if args.baseline:
        names = [m for n in names
                 for m in ([n, f"{n}@{args.baseline}"] if n.startswith("hub") else [n])]
    for where in (args.profile, args.perf):
        if where:
            where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chh-connect-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        key = make_key(workdir / "device_key", "bench")
        echo = Echo()
        stack.callback(echo.close)
        routes: dict[str, tuple[int, list[int]]] = {}
        baseline_env = _export(args.baseline, workdir) if args.baseline else {}
        for name in names:
            where = workdir / name.replace("+", "-").replace("@", "-at-").replace("/", "-")
            where.mkdir()
            server: Hub | ThrowawaySSHD
            if name == "sshd":
                server = ThrowawaySSHD(where, key).start()
                pids = lambda s=server: [s.proc.pid] if s.proc else []  # noqa: E731
            else:
                kind, _, rev = name.partition("@")
                extra = {"hub+keeper": ["--port-keeper"],
                         "hub-2w": ["--workers", "2"]}.get(kind, [])
                if args.port_range:
                    extra += ["--port-range", args.port_range]
                with _environment(baseline_env if rev else {}):
                    server = Hub(where, extra, name).start()
                    server.register(key, where)
                pids = server.pids
            stack.callback(server.close)
            tunnel = Tunnel(where, server, key, echo.port, CIPHER, None).start()
            stack.callback(tunnel.close)
            one(tunnel.port)  # the first connection pays for warming up
            routes[name] = (tunnel.port, pids)
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, float] = dict.fromkeys(names, 0.0)
        for r in range(args.repeat):
            for name in names if r % 2 == 0 else names[::-1]:
                if args.quiet_wait > 0:
                    wait_quiet(0.25, args.quiet_wait)
                port, pids = routes[name]
                # sshd forks a process per connection of the device, not per forwarded
                # connection: its CPU is its listener and the device's session process.
                procs = pids() if name != "sshd" else _sshd_tree(pids())
                spies = [PySpy(pid, args.profile / f"connect-{name}-{r}-{i}.txt")
                         for i, pid in enumerate(pids())] \
                    if args.profile and name != "sshd" else []
                spies += [PerfRecord(pid, (args.perf / f"connect-{name}-{r}-{i}.data").resolve(),
                                     calls=True)
                          for i, pid in enumerate(pids())] \
                    if args.perf and name != "sshd" else []
                before = sum(tree_cpu(procs))
                times[name] += block(port, args.connections)
                cpu[name] += sum(tree_cpu(procs)) - before
                for spy in spies:
                    spy.close()
        rows = []
        print(f"{'server':12} {'conns':>6} {'p50 us':>8} {'p99 us':>8} {'conn/s':>8} "
              f"{'server CPU us/conn':>19}")
        for name in names:
            values = times[name]
            row = {
                "server": name, "connections": len(values),
                "p50_us": round(statistics.median(values) * 1e6),
                "p99_us": round(pct(values, 0.99) * 1e6),
                "per_s": round(len(values) / sum(values)),
                "server_cpu_us": round(cpu[name] / len(values) * 1e6),
            }
            rows.append(row)
            print(f"{name:12} {row['connections']:>6} {row['p50_us']:>8} {row['p99_us']:>8} "
                  f"{row['per_s']:>8} {row['server_cpu_us']:>19}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(
                {"machine": machine_info(), "cipher": CIPHER, "results": rows}, indent=2))
    return 0


def _export(rev: str, workdir: Path) -> dict[str, str]:
    """The environment that runs the hub (twistd, CLI) as of `rev` (runner's
    export), for the baseline hub only: this process's own is left as it was."""
    from runner import use_hub_source

    keys = ("PYTHONPATH", "CALLHOMEHUB_BENCH_CLI")
    before = {k: os.environ.get(k) for k in keys}
    path = list(sys.path)
    use_hub_source(rev, workdir)
    env = {k: os.environ.get(k) or "" for k in keys}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    sys.path[:] = path
    return env


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sshd_tree(pids: list[int]) -> list[int]:
    from common import descendants

    return [p for pid in pids for p in (pid, *descendants(pid))]


if __name__ == "__main__":
    sys.exit(main())
