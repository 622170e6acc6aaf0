"""Aggregate throughput of concurrent tunnels: the hub with `--workers 1` and `2` against sshd.

    .venv/bin/python bench/aggregate.py [--tunnels 8] [--size MiB] [--repeat N]
                                        [--workers 1,2] [--ciphers a,b] [--json FILE]

One run starts, side by side on loopback, one hub per worker count (`twistd
callhomehub --workers W`, the devices written into its registry) and a throwaway
sshd (`GatewayPorts yes`, every device key authorized, as `throughput.py` sets
it up). Each of the --tunnels devices is a real `ssh -N -R 0:127.0.0.1:DEVPORT_i`
to each server with the cipher forced; DEVPORT_i is a loopback server of its own
in this process. A round sends --size MiB through every device's allocated port
at once, one direction per round (as `throughput.py`'s transfers: sendfile in,
compared with the pattern out), and the aggregate is all bytes over the time from the
first stream's start to the last stream's last byte (MiB/s, 2**20 bytes).

The servers take turns, the order rotating every repeat, so load from elsewhere
hits them alike; the medians of the repeats are compared. `direct` is the same
rounds over direct loopback connections: the bench's own ceiling on this machine.
With several workers the kernel hands each device's connection to one worker
(`SO_REUSEPORT`, a hash of the addresses): the `split` column says how many
tunnels each worker held. Every ssh client, the bench and the servers share the
machine's cores, so on a small machine the aggregate is bounded by the CPU all
of them spend per MiB; the `ms/MiB` columns show the servers' share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from attrs import asdict, define, field

# Run as a script: bench/ is on sys.path.
from common import (
    CLK_TCK,
    ThrowawaySSHD,
    Tunnel,
    machine_ticks,
    make_key,
    tree_cpu,
    wait_for,
    wait_quiet,
)
from fleet import register_all
from loopback import DIRECTIONS, MIB, DeviceEndpoint, Pattern, transfer
from peers import HubProcess
from runner import add_common_options, install_sigterm, use_hub_source, write_doc
from throughput import MAC_FOR


@define
class Round:
    """One aggregate transfer: every tunnel of one server at once, one direction."""

    mib_per_s: float
    stream_min: float
    stream_max: float
    server_cpu_s: float
    client_cpu_s: float
    other_cores: float
    busy_before: float
    loadavg: str
    verified: bool


@define
class Case:
    server: str
    cipher: str
    direction: str
    split: str = ""
    rounds: list[Round] = field(factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.mib_per_s for r in self.rounds) if self.rounds else 0.0

    def cpu_ms_per_mib(self, total_mib: float) -> float:
        cpu = statistics.median(r.server_cpu_s for r in self.rounds) if self.rounds else 0.0
        return 1000 * cpu / total_mib


@define(eq=False)
class Server:
    """A server under test: its tunnels' ports, whose CPU counts as its own."""

    name: str
    ports: list[int]
    pids: list[int]
    client_pids: list[int]
    split: str = ""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def listening_inodes(ports: set[int]) -> dict[str, int]:
    """Socket inode -> port for loopback TCP listeners on `ports`."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].rsplit(":", 1)[1], 16)
        if fields[3] == "0A" and port in ports:
            found[fields[9]] = port
    return found


def holders(ports: list[int], pids: list[int]) -> dict[int, int]:
    """Port -> the pid (of `pids`) holding its listening socket."""
    inodes = listening_inodes(set(ports))
    held = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        held[inodes[target[8:-1]]] = pid
    return held


def split_of(ports: list[int], pids: list[int]) -> str:
    """How many tunnels each process holds, largest first, e.g. '5/3'."""
    held = holders(ports, pids)
    counts = sorted((sum(1 for p in ports if held.get(p) == pid) for pid in pids), reverse=True)
    return "/".join(str(c) for c in counts if c) or "?"


def aggregate(endpoints: list[DeviceEndpoint], server: Server, direction: str, size: int,
              quiet: tuple[float, float]) -> Round:
    """Every tunnel's transfer at once; the aggregate rate and who spent the CPU."""
    busy_before = wait_quiet(*quiet) if quiet[1] > 0 else 0.0
    load = loadavg()
    count = len(server.ports)
    starts, seconds, ok = [0.0] * count, [0.0] * count, [False] * count
    gate = threading.Barrier(count + 1)

    def stream(i: int) -> None:
        gate.wait()
        starts[i] = time.perf_counter()
        t = transfer(endpoints[i], server.ports[i], direction, size)
        seconds[i], ok[i] = t.seconds, t.verified

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    cpu0, clients0 = sum(tree_cpu(server.pids)), sum(tree_cpu(server.client_pids))
    busy0, own0 = machine_ticks()[0], sum(os.times()[:2])
    gate.wait()
    for t in threads:
        t.join()
    cpu, clients = sum(tree_cpu(server.pids)) - cpu0, sum(tree_cpu(server.client_pids)) - clients0
    own = sum(os.times()[:2]) - own0
    wall = max(s + d for s, d in zip(starts, seconds, strict=True)) - min(starts)
    busy = (machine_ticks()[0] - busy0) / CLK_TCK
    rates = [size / MIB / d if d else 0.0 for d in seconds]
    return Round(round(count * size / MIB / wall, 1), round(min(rates), 1), round(max(rates), 1),
                 round(cpu, 2), round(clients, 2),
                 round(max(0.0, busy - cpu - clients - own) / wall, 2),
                 round(busy_before, 2), load, all(ok))


# -- the servers and their tunnels ------------------------------------------

@contextlib.contextmanager
def servers(workdir: Path, keys: list[Path], args: argparse.Namespace
            ) -> Iterator[list[HubProcess | ThrowawaySSHD]]:
    """A hub per worker count and sshd, all up for the whole run and always stopped."""
    started: list[HubProcess | ThrowawaySSHD] = []
    try:
        publics = [(key.name, Path(f"{key}.pub").read_text().strip()) for key in keys]
        for workers in args.workers:
            hub_dir = workdir / f"hub-w{workers}"
            hub_dir.mkdir()
            hub = HubProcess(hub_dir, extra=["--workers", str(workers)])
            hub.name = f"hub-w{workers}"
            started.append(hub)
            register_all(hub.data / "hub.sqlite3", publics)
            hub.start()
            # worker 0 listens first; a device arriving before the others listen
            # would always land on it
            wait_for(lambda h=hub, w=workers: h.log_text().count("SSH listening on") >= w,
                     60, f"{workers} workers to listen")
        if args.sshd:
            sshd = ThrowawaySSHD(workdir, keys[0])
            with open(sshd.dir / "authorized_keys", "a") as auth:
                auth.writelines(Path(f"{key}.pub").read_text() for key in keys[1:])
            started.append(sshd)
            sshd.start()
        yield started
    finally:
        for server in started:
            server.close()


def tunnels(stack: contextlib.ExitStack, workdir: Path, server: HubProcess | ThrowawaySSHD,
            keys: list[Path], endpoints: list[DeviceEndpoint], cipher: str,
            balance: bool = False) -> Server:
    """Every device's `ssh -R` to `server`; stopped when `stack` closes."""
    made: list[Tunnel] = []

    def connect(i: int) -> Tunnel:
        where = workdir / f"ssh-{server.name}-{i}"
        where.mkdir(exist_ok=True)
        tunnel = Tunnel(where, server, keys[i], endpoints[i].port, cipher, MAC_FOR.get(cipher))
        stack.callback(tunnel.close)
        return tunnel.start()

    made = [connect(i) for i in range(len(keys))]
    pids = server.pids()
    if isinstance(server, HubProcess) and balance:
        rebalance(made, pids, connect)
    ports = [t.port for t in made]
    clients = [t.proc.pid for t in made if t.proc is not None]
    split = split_of(ports, pids) if isinstance(server, HubProcess) else f"{len(ports)} processes"
    return Server(server.name, ports, pids, clients, split)


def rebalance(made: list[Tunnel], pids: list[int], connect: Callable[[int], Tunnel],
              attempts: int = 60) -> None:
    """Reconnect tunnels of the busiest worker until the workers hold equal shares
    (within one): the kernel's hash alone often gives 8 tunnels on 2 workers as 7/1."""
    for _ in range(attempts):
        held = holders([t.port for t in made], pids)
        counts = {pid: sum(1 for t in made if held.get(t.port) == pid) for pid in pids}
        if max(counts.values()) - min(counts.values()) <= 1:
            return
        busiest = max(counts, key=lambda pid: counts[pid])
        i = next(i for i, t in enumerate(made) if held.get(t.port) == busiest)
        made[i].close()
        made[i] = connect(i)


def run(args: argparse.Namespace, workdir: Path) -> list[Case]:
    pattern = Pattern(workdir / "pattern")
    size = args.size * MIB
    keys = [make_key(workdir / f"dev{i}", f"dev{i}") for i in range(args.tunnels)]
    endpoints = [DeviceEndpoint(pattern) for _ in keys]
    cases: dict[tuple[str, str, str], Case] = {}
    quiet = (args.quiet_below, args.quiet_wait)
    try:
        with servers(workdir, keys, args) as running:
            for cipher in args.ciphers:
                with contextlib.ExitStack() as stack:
                    under = [tunnels(stack, workdir, s, keys, endpoints, cipher, args.balance)
                             for s in running]
                    direct = Server("direct", [e.port for e in endpoints], [], [], "-")
                    order = [*under, direct] if args.direct else under
                    for i in range(args.repeat):
                        shift = i % len(order)
                        for server in order[shift:] + order[:shift]:
                            for direction in args.directions:
                                case = cases.setdefault(
                                    (server.name, cipher, direction),
                                    Case(server.name, cipher, direction, server.split))
                                r = aggregate(endpoints, server, direction, size, quiet)
                                case.rounds.append(r)
                                print(f"  {server.name:8} {cipher.split('@')[0]:18} "
                                      f"{direction:11} {r.mib_per_s:7.1f} MiB/s "
                                      f"(streams {r.stream_min}-{r.stream_max}; load {r.loadavg})"
                                      f"{'' if r.verified else '  NOT VERIFIED'}",
                                      file=sys.stderr, flush=True)
    finally:
        for endpoint in endpoints:
            endpoint.close()
    return list(cases.values())


# -- the report --------------------------------------------------------------

def table(cases: list[Case], args: argparse.Namespace) -> str:
    total = args.tunnels * args.size
    lines = [f"{'server':8} {'cipher':18} {'direction':11} {'MiB/s':>7} {'range':>13} "
             f"{'/sshd':>6} {'ms/MiB':>7} {'other':>6} {'split':>12} loadavg before rounds"]
    by = {(c.server, c.cipher, c.direction): c for c in cases}
    for c in cases:
        sshd = by.get(("sshd", c.cipher, c.direction))
        ratio = f"{c.median / sshd.median:.2f}" if sshd and sshd.median else "-"
        rates = [r.mib_per_s for r in c.rounds]
        other = statistics.median(r.other_cores for r in c.rounds)
        ok = "" if all(r.verified for r in c.rounds) else "  NOT VERIFIED"
        lines.append(
            f"{c.server:8} {c.cipher.split('@')[0]:18} {c.direction:11} {c.median:7.1f} "
            f"{min(rates):6.0f}-{max(rates):<6.0f} {ratio:>6} "
            f"{c.cpu_ms_per_mib(total) if c.server != 'direct' else 0:7.2f} {other:6.2f} "
            f"{c.split:>12} {'; '.join(r.loadavg for r in c.rounds)}{ok}")
    lines += ratios(cases, by)
    return "\n".join(lines)


def ratios(cases: list[Case], by: dict[tuple[str, str, str], Case]) -> list[str]:
    """Each hub over sshd, and more workers over one, per cipher and direction."""
    lines = []
    for c in cases:
        if not c.server.startswith("hub"):
            continue
        sshd = by.get(("sshd", c.cipher, c.direction))
        one = by.get(("hub-w1", c.cipher, c.direction))
        parts = []
        if sshd and sshd.median:
            parts.append(f"{c.median / sshd.median:.2f}x sshd")
        if one and one is not c and one.median:
            parts.append(f"{c.median / one.median:.2f}x 1 worker")
        if parts:
            lines.append(f"ratio {c.server} {c.cipher.split('@')[0]} {c.direction}: "
                         + ", ".join(parts))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tunnels", type=int, default=8, help="devices, one tunnel each (default 8)")
    p.add_argument("--size", type=int, default=64, help="MiB per tunnel per round (default 64)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds per case, the median is reported (default 3)")
    p.add_argument("--workers", default="1,2", help="hub --workers counts (default 1,2)")
    p.add_argument("--ciphers", default="aes128-gcm@openssh.com",
                   help="comma-separated ssh cipher names (default aes128-gcm@openssh.com)")
    p.add_argument("--directions", default=",".join(DIRECTIONS),
                   help="comma-separated: to-device, from-device")
    p.add_argument("--balance", action="store_true",
                   help="reconnect tunnels until every worker holds an equal share (the "
                        "kernel's hash alone may give 7/1): the workers' capacity, not the "
                        "hash's luck")
    p.add_argument("--no-sshd", dest="sshd", action="store_false")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="leave out the direct-loopback rounds")
    add_common_options(p)
    p.set_defaults(quiet_wait=10.0)
    args = p.parse_args(argv)
    args.workers = [int(v) for v in str(args.workers).split(",") if v]
    args.ciphers = [c for c in args.ciphers.split(",") if c]
    args.directions = [d for d in args.directions.split(",") if d]
    if not set(args.directions) <= set(DIRECTIONS) or args.tunnels < 1 or args.size < 1:
        p.error("--directions takes to-device and/or from-device; --tunnels and --size > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    with tempfile.TemporaryDirectory(prefix="callhomehub-aggregate-") as tmp:
        source = use_hub_source(args.hub_source, Path(tmp))
        cases = run(args, Path(tmp))
    print(table(cases, args))
    if args.json:
        write_doc(args.json, "aggregate", {
            "tunnels": args.tunnels, "size_mib": args.size, "repeat": args.repeat,
            "workers": args.workers, **source,
            "cases": [{**asdict(c), "median_mib_per_s": c.median,
                       "server_cpu_ms_per_mib": round(c.cpu_ms_per_mib(
                           args.tunnels * args.size), 2)} for c in cases]})
    return 0 if all(r.verified for c in cases for r in c.rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
