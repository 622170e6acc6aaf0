"""Bulk TCP throughput through a per-device port: callhomehub vs OpenSSH sshd.

    .venv/bin/python bench/throughput.py [--size MiB] [--repeat N] [--ciphers a,b]
                                         [--servers hub,sshd] [--json FILE] [--quick]

One run starts both rendezvous servers on loopback (the hub as `twistd -n
callhomehub`, a throwaway `sshd -D`) and, for each cipher, connects the same
`ssh -N -R 0:127.0.0.1:DEVPORT` client to each with that cipher forced. DEVPORT
is a loopback server in this process standing for the device's service; a
client in this process connects to the port the server allocated, and bytes
flow one way per transfer:

- to-device:   hub-side client -> allocated port -> tunnel -> device endpoint
- from-device: device endpoint -> tunnel -> allocated port -> hub-side client

Transfers through the hub and through sshd alternate (the order flips every
repeat), so load from elsewhere on the machine hits both alike; the median of
the repeats is reported. The same transfers over a direct loopback connection
come first: that is the bench's own ceiling. MB/s are 10**6 bytes per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from attrs import asdict, define, field

# Run as a script: bench/ is on sys.path.
from common import (
    CLK_TCK,
    Hub,
    PySpy,
    ThrowawaySSHD,
    Tunnel,
    cpu_seconds,
    machine_info,
    machine_ticks,
    make_key,
    reset_hwm,
    tree_cpu,
    tree_max,
    vm_hwm_kib,
    vm_rss_kib,
    wait_quiet,
)
from loopback import DIRECTIONS, MIB, DeviceEndpoint, Pattern, transfer
from perfrecord import PerfRecord
from runner import add_source_option, use_hub_source

# Every cipher OpenSSH offers by default, and the CTR ciphers with the other
# EtM MAC the hub offers. A case is CIPHER or CIPHER:MAC.
DEFAULT_CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com",
                   "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr",
                   "aes256-ctr:hmac-sha2-512-etm@openssh.com")
# Non-AEAD ciphers need a MAC; unless the case names one, force the one OpenSSH
# prefers of those the hub offers (it has no umac).
MAC_FOR = {"aes128-ctr": "hmac-sha2-256-etm@openssh.com",
           "aes192-ctr": "hmac-sha2-256-etm@openssh.com",
           "aes256-ctr": "hmac-sha2-256-etm@openssh.com"}


def split_case(case: str) -> tuple[str, str | None]:
    """`CIPHER[:MAC]` as the cipher and the MAC to force (None: AEAD)."""
    cipher, _, mac = case.partition(":")
    return cipher, mac or MAC_FOR.get(cipher)


def case_label(cipher: str, mac: str) -> str:
    """How the table names a case: the cipher, and the MAC if not the default."""
    short = cipher.split("@")[0]
    if mac in ("", "none", "<implicit>", MAC_FOR.get(cipher)):
        return short
    return f"{short}+{mac.split('@')[0].removeprefix('hmac-')}"
Server = Hub | ThrowawaySSHD


@define(frozen=True)
class Route:
    """Where a transfer connects and whose processes it charges."""

    server: str
    port: int
    server_pids: Callable[[], list[int]]
    client_pid: int | None = None


@define
class Result:
    server: str
    cipher: str
    mac: str
    direction: str
    negotiated: str = ""
    mb_per_s: list[float] = field(factory=list)
    verified: bool = True
    mib: float = 0.0
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    server_sys_s: float = 0.0  # the kernel's share of server_cpu_s
    client_cpu_s: float = 0.0
    bench_cpu_s: float = 0.0
    other_cpu_s: float = 0.0   # everything else on the machine meanwhile
    load_before: list[float] = field(factory=list)  # cores busy just before each transfer
    server_rss_before_kib: int = 0
    server_peak_rss_kib: int = 0
    server_rss_reset: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.mb_per_s) if self.mb_per_s else 0.0

    def per_mib(self, cpu_s: float) -> float:
        return cpu_s / self.mib if self.mib else 0.0

    def summary(self) -> dict[str, object]:
        return {**asdict(self), "median_mb_per_s": self.median,
                "server_cpu_ms_per_mib": round(1000 * self.per_mib(self.server_cpu_s), 3),
                "server_sys_ms_per_mib": round(1000 * self.per_mib(self.server_sys_s), 3),
                "client_cpu_ms_per_mib": round(1000 * self.per_mib(self.client_cpu_s), 3),
                "bench_cpu_ms_per_mib": round(1000 * self.per_mib(self.bench_cpu_s), 3),
                "other_load_cores": round(self.other_cpu_s / self.seconds, 2)
                if self.seconds else 0.0,
                "chain_cores": round(self.chain_cores, 2)}

    @property
    def chain_cores(self) -> float:
        """Cores the transfer kept busy: the server, the ssh client and the bench's
        sender and receiver. On a machine with few cores the rate follows this and
        their CPU per MiB together, not the server's alone."""
        return ((self.server_cpu_s + self.client_cpu_s + self.bench_cpu_s) / self.seconds
                if self.seconds else 0.0)


# -- measuring ---------------------------------------------------------------

@define(frozen=True)
class Snapshot:
    wall: float
    server: float
    server_sys: float
    client: float
    bench: float
    busy: float

    @classmethod
    def take(cls, route: Route, pids: list[int]) -> Snapshot:
        own = os.times()
        user, system = tree_cpu(pids)
        return cls(time.perf_counter(), user + system, system,
                   cpu_seconds(route.client_pid) if route.client_pid else 0.0,
                   own.user + own.system, machine_ticks()[0] / CLK_TCK)


@define(frozen=True)
class Plan:
    """What every case does: bytes per transfer, transfers, and how long to wait
    for other work on the machine to calm down before each transfer."""

    size: int
    repeat: int
    quiet_below: float = 0.25
    quiet_wait: float = 0.0
    directions: tuple[str, ...] = DIRECTIONS


def measure_once(endpoint: DeviceEndpoint, route: Route, direction: str, plan: Plan,
                 result: Result) -> None:
    """One transfer, charged to `result` with the CPU every party used meanwhile."""
    if plan.quiet_wait > 0:
        result.load_before.append(round(wait_quiet(plan.quiet_below, plan.quiet_wait), 2))
    size = plan.size
    pids = route.server_pids()
    before = Snapshot.take(route, pids)
    t = transfer(endpoint, route.port, direction, size)
    after = Snapshot.take(route, pids)
    result.mb_per_s.append(round(t.mb_per_s(), 1))
    result.verified = result.verified and t.verified
    result.mib += size / MIB
    result.seconds += after.wall - before.wall
    server, client = after.server - before.server, after.client - before.client
    bench = after.bench - before.bench
    result.server_cpu_s += server
    result.server_sys_s += after.server_sys - before.server_sys
    result.client_cpu_s += client
    result.bench_cpu_s += bench
    result.other_cpu_s += max(0.0, after.busy - before.busy - server - client - bench)


def compare(endpoint: DeviceEndpoint, routes: list[Route], direction: str, plan: Plan
            ) -> dict[str, Result]:
    """`repeat` transfers per route, alternating routes, with peak RSS per route."""
    results = {r.server: Result(r.server, "", "", direction) for r in routes}
    for route in routes:
        pids = route.server_pids()
        results[route.server].server_rss_reset = all([reset_hwm(pid) for pid in pids])
        results[route.server].server_rss_before_kib = tree_max(vm_rss_kib, pids)
    for i in range(plan.repeat):
        for route in routes if i % 2 == 0 else routes[::-1]:
            measure_once(endpoint, route, direction, plan, results[route.server])
    for route in routes:
        results[route.server].server_peak_rss_kib = tree_max(vm_hwm_kib, route.server_pids())
    return results


def ceiling(endpoint: DeviceEndpoint, plan: Plan) -> list[Result]:
    """The bench alone: the same transfers over a direct loopback connection."""
    direct = Route("direct", endpoint.port, lambda: [])
    results = []
    for direction in plan.directions:
        r = compare(endpoint, [direct], direction, plan)["direct"]
        r.cipher = r.mac = "none"
        results.append(r)
    return results


def through(running: list[Server], workdir: Path, key: Path, endpoint: DeviceEndpoint,
            case: str, plan: Plan) -> list[Result]:
    """Both directions through every server, with `ssh -R` forcing the case's
    cipher (and MAC)."""
    cipher, mac = split_case(case)
    with contextlib.ExitStack() as stack:
        routes, negotiated = [], {}
        for server in running:
            tunnel = Tunnel(workdir, server, key, endpoint.port, cipher, mac)
            stack.callback(tunnel.close)
            try:
                tunnel.start()
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{e}\n{server.name} log:\n{server.log_text()[-8000:]}"
                                   ) from None
            negotiated[server.name] = " ".join(tunnel.negotiated())
            routes.append(Route(server.name, tunnel.port, server.pids,
                                tunnel.proc.pid if tunnel.proc else None))
        results = []
        for direction in plan.directions:
            for name, r in compare(endpoint, routes, direction, plan).items():
                r.cipher, r.mac, r.negotiated = cipher, mac or "<implicit>", negotiated[name]
                results.append(r)
        return results


# -- the program -------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    p.add_argument("--repeat", type=int, default=1,
                   help="transfers per case, the median is reported (default 1)")
    p.add_argument("--ciphers", default=",".join(DEFAULT_CIPHERS),
                   help="comma-separated ssh cipher names, each optionally :MAC "
                        "(default: %(default)s)")
    p.add_argument("--servers", default="hub,sshd", help="comma-separated: hub, sshd")
    p.add_argument("--directions", default=",".join(DIRECTIONS),
                   help="comma-separated: to-device, from-device")
    p.add_argument("--json", type=Path, help="write all results and machine info here")
    p.add_argument("--quick", action="store_true", help="32 MiB, 1 repeat")
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="S",
                   help="before each transfer wait up to S seconds for other work on the "
                        "machine to drop below --quiet-below cores (default 20; 0: never)")
    p.add_argument("--quiet-below", type=float, default=0.25, metavar="CORES")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="record the hub with py-spy (collapsed stacks) into FILE; "
                        "summarise with bench/stacks.py")
    p.add_argument("--native", action="store_true",
                   help="with --profile: native (C) frames too")
    p.add_argument("--perf", type=Path, metavar="FILE",
                   help="record the hub's CPU time with Linux `perf record` (no call "
                        "graphs) into FILE: where it goes by library and symbol, "
                        "`perf report -i FILE --sort dso,sym`")
    add_source_option(p)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeat, args.quiet_wait = 32, 1, min(args.quiet_wait, 2.0)
    args.ciphers = [c for c in args.ciphers.split(",") if c]
    args.servers = [s for s in args.servers.split(",") if s]
    args.directions = tuple(d for d in args.directions.split(",") if d)
    if not set(args.servers) <= {"hub", "sshd"} or not set(args.directions) <= set(DIRECTIONS):
        p.error("--servers takes hub and/or sshd, --directions to-device and/or from-device")
    if args.size < 1 or args.repeat < 1:
        p.error("--size and --repeat must be positive")
    return args


@contextlib.contextmanager
def servers(workdir: Path, key: Path, args: argparse.Namespace) -> Iterator[list[Server]]:
    """The rendezvous servers, up for the whole run and always stopped."""
    names = args.servers
    started: list[Server] = []
    profiler: PySpy | None = None
    perf: PerfRecord | None = None
    try:
        if "hub" in names:
            hub = Hub(workdir)
            started.append(hub)
            hub.start().register(key, workdir)
            if args.profile and hub.proc is not None:
                profiler = PySpy(hub.proc.pid, args.profile.resolve(), args.native)
            if args.perf and hub.proc is not None:
                perf = PerfRecord(hub.proc.pid, args.perf.resolve())
        if "sshd" in names:
            sshd = ThrowawaySSHD(workdir, key)
            started.append(sshd)
            sshd.start()
        yield started
    finally:
        if profiler is not None:
            profiler.close()
        if perf is not None:
            perf.close()
        for server in started:
            server.close()


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    plan = Plan(args.size * MIB, args.repeat, args.quiet_below, args.quiet_wait, args.directions)
    key = make_key(workdir / "device_key", "bench")
    endpoint = DeviceEndpoint(Pattern(workdir / "pattern"))
    try:
        results = ceiling(endpoint, plan)
        progress(results)
        with servers(workdir, key, args) as running:
            for cipher in args.ciphers:
                found = through(running, workdir, key, endpoint, cipher, plan)
                progress(found)
                results += found
        return results
    finally:
        endpoint.close()


def progress(results: list[Result]) -> None:
    for r in results:
        print(f"  {r.server:6} {r.cipher:30} {r.direction:11} {r.mb_per_s} MB/s"
              f"{'' if r.verified else '  NOT VERIFIED'}", file=sys.stderr, flush=True)


# -- the report --------------------------------------------------------------

HEADER = (f"{'cipher':26} {'direction':11} {'hub MB/s':>8} {'sshd MB/s':>9} {'hub/sshd':>8} "
          f"{'hub ms/MiB':>10} {'sshd ms/MiB':>11} {'hub HWM':>8} {'sshd HWM':>8} "
          f"{'busy h/s':>9} {'other load':>10} verified")


def table(results: list[Result]) -> str:
    """Hub and sshd side by side per cipher and direction, with the ratio."""
    by = {(r.server, case_label(r.cipher, r.mac), r.direction): r for r in results}
    lines = [HEADER]
    for direction in DIRECTIONS:
        direct = by.get(("direct", "none", direction))
        if direct:
            lines.append(f"{'(direct loopback)':26} {direction:11} {direct.median:8.0f} "
                         f"{'':9} {'':8} {'':10} {'':11} {'':8} {'':8} {'':9} "
                         f"{other_load([direct]):>10} {yes(direct.verified)}")
    for cipher in dict.fromkeys(c for s, c, _ in by if s != "direct"):
        for direction in dict.fromkeys(d for s, c, d in by if c == cipher):
            lines.append(row(cipher, direction, by.get(("hub", cipher, direction)),
                             by.get(("sshd", cipher, direction))))
    return "\n".join(lines)


def row(cipher: str, direction: str, hub: Result | None, sshd: Result | None) -> str:
    def num(r: Result | None, get: Callable[[Result], float], fmt: str) -> str:
        return format(get(r), fmt) if r else "-"

    def cpu(r: Result) -> float:
        return 1000 * r.per_mib(r.server_cpu_s)

    def hwm(r: Result) -> float:
        return r.server_peak_rss_kib / 1024

    def busy(r: Result) -> float:
        return r.chain_cores

    ratio = f"{hub.median / sshd.median:.2f}" if hub and sshd and sshd.median else "-"
    both = [r for r in (hub, sshd) if r]
    return (f"{cipher:26} {direction:11} {num(hub, lambda r: r.median, '.0f'):>8} "
            f"{num(sshd, lambda r: r.median, '.0f'):>9} {ratio:>8} "
            f"{num(hub, cpu, '.2f'):>10} {num(sshd, cpu, '.2f'):>11} "
            f"{num(hub, hwm, '.0f') + ' M':>8} {num(sshd, hwm, '.0f') + ' M':>8} "
            f"{num(hub, busy, '.2f') + '/' + num(sshd, busy, '.2f'):>9} "
            f"{other_load(both):>10} {yes(all(r.verified for r in both))}")


def other_load(results: list[Result]) -> str:
    """Cores busy with work that was not ours while these transfers ran."""
    seconds = sum(r.seconds for r in results)
    return f"{sum(r.other_cpu_s for r in results) / seconds:.2f}" if seconds else "-"


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def write_json(path: Path, args: argparse.Namespace, machine: dict[str, object],
               results: list[Result]) -> None:
    doc = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "size_mib": args.size, "repeat": args.repeat, "ciphers": args.ciphers,
        "machine": machine,
        "results": [r.summary() for r in results],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def stop_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through the finally blocks that stop servers and clients.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    machine = machine_info()
    print(f"{machine['cpu_model']}, {machine['cores']} cores; {args.size} MiB x "
          f"{args.repeat} per case", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="callhomehub-bench-") as tmp:
        machine.update(use_hub_source(args.hub_source, Path(tmp)))
        results = run(args, Path(tmp))
    print(table(results))
    if args.json:
        write_json(args.json, args, machine, results)
    return 0 if all(r.verified for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
