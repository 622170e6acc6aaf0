"""Added latency of cross-hub routing: a node on hub A reached through hub B, against hub A.

    .venv/bin/python bench/cluster.py [--round-trips N] [--repeat R] [--quick] [--json FILE]

Setup as docs/cluster.md runs two hubs on one machine: hub A and hub B share
one registry file (B's data directory holds a copy of A's host and management
keys, its own peer key, and a symlink to A's hub.sqlite3), each with a peer
listener on loopback and its own public interface (A 127.0.0.3, B 127.0.0.2).
A throwaway `sshd` stands for the device and calls hub A with
`ssh -N -R 0:127.0.0.1:SSHDPORT cms@A`; `approve bench`, `access bench on`,
`user add alice --allow '*'`. Four paths to the same device sshd:

- gateway-a:  ssh -p A alice:bench@127.0.0.1 cat   (hub A logs in to the device)
- gateway-b:  ssh -p B alice:bench@127.0.0.1 cat   (hub B logs in through hub A's relay)
- port-a:     ssh -p SDTPORT root@127.0.0.3 cat    (hub A's per-device port)
- port-b:     ssh -p SDTPORT root@127.0.0.2 cat    (hub B's port, relayed to hub A)

One long-lived `cat` per path: write a 9-byte line, wait for its echo, N times;
p50/p99 of the round trips. Paths alternate (order flipped every repeat).
The added latency is each B path against its A path, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from attrs import define, field

# Run as a script: bench/ is on sys.path.
from common import SSH, PySpy, machine_info, make_key, wait_for, wait_quiet
from gateway import echo, ssh_config
from peers import HubProcess, approved_device
from runner import add_common_options, install_sigterm, percentile, use_hub_source, write_doc

PATHS = ("gateway-a", "gateway-b", "port-a", "port-b")
PUBLIC = {"a": "127.0.0.3", "b": "127.0.0.2"}
PEER_KEY = "hub_peer_ed25519_key"


@define(frozen=True)
class Site:
    config: Path
    a: HubProcess
    b: HubProcess
    port: int  # the device's per-device (SDT) port, on both hubs' public interfaces

    def command(self, path: str, remote: str) -> list[str]:
        base = [SSH, "-F", str(self.config), "-T"]
        which, side = path.split("-")
        if which == "gateway":
            hub = self.a if side == "a" else self.b
            return [*base, "-p", str(hub.port), "alice:bench@127.0.0.1", remote]
        return [*base, "-p", str(self.port), f"root@{PUBLIC[side]}", remote]


@define
class Result:
    path: str
    rtt_us: list[float] = field(factory=list)
    load_before: list[float] = field(factory=list)

    def summary(self) -> dict[str, float]:
        return {"p50_us": round(percentile(self.rtt_us, 50), 1),
                "p90_us": round(percentile(self.rtt_us, 90), 1),
                "p99_us": round(percentile(self.rtt_us, 99), 1),
                "max_us": round(max(self.rtt_us, default=0.0), 1),
                "round_trips": len(self.rtt_us)}


def hub_options(side: str) -> list[str]:
    return ["--peer", "tcp:0:interface=127.0.0.1", "--public-interface", PUBLIC[side]]


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            return s.recv(100).startswith(b"SSH-2.0-")
    except OSError:
        return False


@contextlib.contextmanager
def site(workdir: Path) -> Iterator[Site]:
    """Two hubs on one registry, the device on hub A, alice; always stopped."""
    with contextlib.ExitStack() as stack:
        (workdir / "a").mkdir()
        (workdir / "b").mkdir()
        a = HubProcess(workdir / "a", config='[cluster]\nid = "hub-a"\n',
                       extra=hub_options("a"))
        stack.callback(a.close)
        a.start()
        b = HubProcess(workdir / "b", config='[cluster]\nid = "hub-b"\n',
                       extra=hub_options("b"))
        # Hub B: A's host and management keys (not its peer key), A's registry.
        for stale in b.data.glob("hub.sqlite3*"):
            stale.unlink()
        shutil.copytree(a.data / "keys", b.data / "keys",
                        ignore=shutil.ignore_patterns(f"{PEER_KEY}*"))
        (b.data / "hub.sqlite3").symlink_to(a.data / "hub.sqlite3")
        stack.callback(b.close)
        b.start()
        alice = make_key(workdir / "alice", "alice")
        _, tunnel = approved_device(stack, workdir, a, [alice])
        a.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "*")
        a.cli("access", "bench", "on")
        for side in ("a", "b"):
            wait_for(lambda: answers(PUBLIC[side], tunnel.port), 30,  # noqa: B023
                     f"the device port on hub {side.upper()}'s public interface")
        yield Site(ssh_config(workdir, alice), a, b, tunnel.port)


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    log = workdir / "ssh.log"
    with site(workdir) as s:
        results = {path: Result(path) for path in PATHS}
        for repeat in range(args.repeat):
            for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:
                r = results[path]
                if args.quiet_wait > 0:
                    r.load_before.append(round(wait_quiet(args.quiet_below, args.quiet_wait), 2))
                spies = ([PySpy(hub.proc.pid, args.profile / f"{path}-{name}-{repeat}.txt")
                          for name, hub in (("a", s.a), ("b", s.b)) if hub.proc is not None]
                         if args.profile else [])
                try:
                    r.rtt_us += echo(s, path, args.round_trips, log)  # type: ignore[arg-type]
                finally:
                    for spy in spies:
                        spy.close()
                summary = r.summary()
                print(f"  {path:9} p50 {summary['p50_us']:7.0f} us  "
                      f"p99 {summary['p99_us']:7.0f} us", file=sys.stderr, flush=True)
    return list(results.values())


def added(by: dict[str, dict[str, float]], what: str) -> dict[str, float]:
    return {p: round(by[f"{p}-b"][what] - by[f"{p}-a"][what], 1) for p in ("gateway", "port")}


def table(results: list[Result]) -> str:
    by = {r.path: r.summary() for r in results}
    lines = [f"{'path':10} {'p50 us':>8} {'p99 us':>8} {'added p50':>10} {'added p99':>10}"]
    for r in results:
        s = by[r.path]
        base = by[r.path.replace("-b", "-a")]
        lines.append(f"{r.path:10} {s['p50_us']:8.0f} {s['p99_us']:8.0f} "
                     f"{s['p50_us'] - base['p50_us']:10.0f} {s['p99_us'] - base['p99_us']:10.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--round-trips", type=int, default=2000,
                   help="echo round trips per path and repeat (default 2000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per path (default 3)")
    p.add_argument("--quick", action="store_true", help="300 round trips, 1 run")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy both hubs during each path, collapsed stacks into DIR")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.round_trips, args.repeat = 300, 1
        args.quiet_wait = min(args.quiet_wait, 2.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    with tempfile.TemporaryDirectory(prefix="callhomehub-cluster-") as tmp:
        source = use_hub_source(args.hub_source, Path(tmp))
        results = run(args, Path(tmp))
    print(table(results))
    if args.json:
        by = {r.path: r.summary() for r in results}
        write_doc(args.json, "cluster", {
            "round_trips": args.round_trips, "repeat": args.repeat,
            "machine": machine_info(), **source,
            "results": [{"path": r.path, "load_before": r.load_before, **r.summary()}
                        for r in results],
            "summary": {**by, "added_p50_us": added(by, "p50_us"),
                        "added_p99_us": added(by, "p99_us")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
