"""Added latency and bulk output of the console gateway and jump host, against going
straight to the device and against the same work done by OpenSSH's sshd.

    .venv/bin/python bench/gateway.py [--round-trips N] [--size MiB] [--repeat R]
                                      [--workers 1,2] [--profile DIR]
                                      [--quick | --full] [--json FILE]

Setup as an operator meets it: a throwaway `sshd` stands for the device and
authorizes the hub's management key, alice's key and the rendezvous host's
key; the device calls home with `ssh -N -R 0:127.0.0.1:SSHDPORT cms@hub`;
`callhomehub approve bench` pins its host key; `callhomehub user add alice
--allow '*'`. The same device also calls home to a self-built rendezvous, a
second throwaway sshd (`ssh -N -R 0:127.0.0.1:SSHDPORT root@127.0.0.1 -p RV`,
which allocates PORT). Five paths to the same device sshd, each with the
OpenSSH client (no pty, pipes):

- direct:      ssh -p SSHDPORT root@127.0.0.1 CMD
- gateway:     ssh -p HUBPORT alice:bench@127.0.0.1 CMD   (the hub logs in to the device itself)
- sshd-nested: ssh -p RV root@127.0.0.1 ssh -p PORT root@localhost CMD   (the inner ssh runs on
               the rendezvous host with its own key and the device's host key pinned)
- jump:        ssh -J alice@127.0.0.1:HUBPORT root@bench CMD   (the hub only relays)
- sshd-jump:   ssh -J root@127.0.0.1:RV -p PORT root@localhost CMD

`gateway` and `sshd-nested` each do three SSH layers on the server machine (the
device's tunnel, a client session to the device inside it, the operator's
session), `jump` and `sshd-jump` two: the output pairs them and prints hub/sshd
ratios of bulk MB/s, echo p50/p99 and server CPU per MiB of bulk (the hub's
processes; every process of the rendezvous sshd, the nested ssh client
included, ended ones too). Each path's chain CPU per MiB adds the operator's
ssh and the device's sshd and `ssh -R`: every process on the way, and the
`ceiling` the machine's cores allow at that cost. `--workers 1,2` repeats the
whole set with a fresh hub per count (`--workers W`; the sshd paths again, side
by side) and notes for each bulk transfer on which worker the operator's connection and the device's
tunnel were (w0 = the twistd process).

Echo: one long-lived `cat` session per path; write a short line, wait for its
echo, N times; p50/p99 of the round trips. Bulk: `head -c SIZE /dev/zero`,
MB/s from the first byte to EOF. Paths alternate (order flipped every repeat).
Echo CPU: the server's CPU per round trip (the hub's processes, or the
rendezvous sshd's), from the first timed round trip to the last.
`--profile DIR` records every hub process with py-spy during the hub paths'
echo round trips (`*-echo-I.txt`) and bulk transfers (bench/stacks.py summarizes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from attrs import asdict, define, field

# Run as a script: bench/ is on sys.path.
from common import (
    SSH,
    PySpy,
    Tunnel,
    descendants,
    machine_info,
    make_key,
    port_range,
    server_cpu,
    stop_process,
    tree_cpu,
    wait_for,
    wait_quiet,
)
from peers import DeviceSSHD, HubProcess, Rendezvous, approved_device
from runner import add_common_options, install_sigterm, percentile, use_hub_source, write_doc

PATHS = ("direct", "gateway", "sshd-nested", "jump", "sshd-jump")
# Each hub path and the sshd path that does the same work on the server machine.
PEERS = {"gateway": "sshd-nested", "jump": "sshd-jump"}
MIB = 1 << 20
# Kept run by run in the JSON (the summary's medians take their names).
PER_RUN = ("bulk_mb_per_s", "server_cpu_ms_per_mib", "chain_cpu_ms_per_mib", "echo_cpu_us")
IO_TIMEOUT = 60.0


@define(frozen=True)
class Site:
    """Everything a path needs: the ssh config, the ports, whose CPU to charge."""

    config: Path
    hub: HubProcess
    device: DeviceSSHD
    tunnel: Tunnel
    rendezvous: Rendezvous
    workers: int

    def command(self, path: str, remote: str) -> list[str]:
        base = [SSH, "-F", str(self.config), "-T"]
        rv = self.rendezvous
        if path == "direct":
            return [*base, "-p", str(self.device.port), "root@127.0.0.1", remote]
        if path == "gateway":
            return [*base, "-p", str(self.hub.port), "alice:bench@127.0.0.1", remote]
        if path == "jump":
            return [*base, "-J", f"alice@127.0.0.1:{self.hub.port}", "root@bench", remote]
        if path == "sshd-jump":
            return [*base, "-J", f"root@127.0.0.1:{rv.port}", "-p", str(rv.forward),
                    "root@localhost", remote]
        return [*base, "-p", str(rv.port), "root@127.0.0.1", rv.nested(remote)]

    def server_cpu(self, path: str) -> float:
        """CPU seconds so far of the server `path` goes through (none for direct)."""
        if path.startswith("sshd-"):
            return self.rendezvous.cpu_seconds()
        return sum(tree_cpu(self.hub.pids())) if path != "direct" else 0.0

    def device_pids(self) -> set[int]:
        assert self.device.proc is not None
        return set(descendants(self.device.proc.pid))

    def device_cpu(self) -> float:
        """CPU seconds so far of the device: its sshd and both call-home clients."""
        assert self.device.proc is not None
        tunnels = [t.proc.pid for t in (self.tunnel, self.rendezvous.tunnel) if t.proc]
        return server_cpu([self.device.proc.pid, *self.device_pids(), *tunnels])

    def settle(self, path: str, device_before: set[int]) -> None:
        """After a connection: until the CPU figures have its ended processes."""
        if path.startswith("sshd-"):
            self.rendezvous.settle()
        # The gateway may keep its login to the device for the next session.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: self.device_pids() <= device_before, 2, "the device's sshd")


@define
class Result:
    path: str
    workers: int = 1
    rtt_us: list[float] = field(factory=list)
    # The server's CPU per echo round trip, per run (none for direct).
    echo_cpu_us: list[float] = field(factory=list)
    bulk_mb_per_s: list[float] = field(factory=list)
    bulk_ok: bool = True
    server_cpu_ms_per_mib: list[float] = field(factory=list)
    chain_cpu_ms_per_mib: list[float] = field(factory=list)
    # Hub paths with several workers: "operator wI, device wJ" per bulk transfer.
    placement: list[str] = field(factory=list)
    load_before: list[float] = field(factory=list)

    def summary(self) -> dict[str, float]:
        return {"p50_us": round(percentile(self.rtt_us, 50), 1),
                "p90_us": round(percentile(self.rtt_us, 90), 1),
                "p99_us": round(percentile(self.rtt_us, 99), 1),
                "max_us": round(max(self.rtt_us, default=0.0), 1),
                "echo_cpu_us": median(self.echo_cpu_us),
                "bulk_mb_per_s": median(self.bulk_mb_per_s),
                "server_cpu_ms_per_mib": median(self.server_cpu_ms_per_mib),
                "chain_cpu_ms_per_mib": median(self.chain_cpu_ms_per_mib)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# -- measuring ---------------------------------------------------------------

class Pipe:
    """An ssh client driven through pipes: write bytes, wait for bytes."""

    def __init__(self, args: list[str], log: Path) -> None:
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def read(self) -> bytes:
        ready, _, _ = select.select([self.rfd], [], [], IO_TIMEOUT)
        if not ready:
            raise TimeoutError("no output from ssh")
        return os.read(self.rfd, 1 << 20)

    def expect(self, line: bytes) -> None:
        seen = b""
        while not seen.endswith(line):
            chunk = self.read()
            if not chunk:
                raise RuntimeError(f"EOF from ssh before {line!r}")
            seen += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.wfd)
        # After EOF ssh ends by itself; a SIGTERM now would cut the server's side short
        # (sshd's session process then ended unreaped by its monitor, its CPU uncounted).
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        stop_process(self.proc)  # type: ignore[arg-type]
        with contextlib.suppress(OSError):
            os.close(self.rfd)


def echo(site: Site, path: str, count: int, log: Path, profile: Path | None = None
         ) -> tuple[list[float], float]:
    """`count` round trips of a 9-byte line through `cat` on the device, in
    microseconds, and the server's CPU seconds for them (the login excluded);
    py-spy of every hub process into `profile`-I.txt meanwhile, if given."""
    pipe = Pipe(site.command(path, "cat"), log)
    spies: list[PySpy] = []
    try:
        os.write(pipe.wfd, b"warmup\n")
        pipe.expect(b"warmup\n")
        if profile is not None:
            spies = [PySpy(pid, profile.with_name(f"{profile.name}-{i}.txt"))
                     for i, pid in enumerate(site.hub.pids())]
        cpu = site.server_cpu(path)
        rtts = []
        for i in range(count):
            line = b"%08d\n" % i
            start = time.perf_counter()
            os.write(pipe.wfd, line)
            pipe.expect(line)
            rtts.append((time.perf_counter() - start) * 1e6)
        return rtts, site.server_cpu(path) - cpu
    finally:
        for spy in spies:
            spy.close()
        pipe.close()


@define
class Bulk:
    mb_per_s: float
    complete: bool
    server_cpu_s: float
    # Every process on the way: the operator's ssh, the server, the device's sshd
    # and ssh -R; on 2 cores, 2 / this is the machine's ceiling for the path.
    chain_cpu_s: float
    placement: str


def bulk(site: Site, path: str, size: int, log: Path) -> Bulk:
    """`size` bytes of output through `path`: rate, completeness, server CPU, placement."""
    device_before = site.device_pids()
    pipe = Pipe(site.command(path, f"head -c {size} /dev/zero"), log)
    try:
        got = len(pipe.read())
        placement = where(site, pipe.proc.pid) if path in PEERS else ""
        # From here on: the transfer, not the logins.
        client = reaped_cpu() + sum(tree_cpu([pipe.proc.pid, *descendants(pipe.proc.pid)]))
        server, device = site.server_cpu(path), site.device_cpu()
        start = time.perf_counter()
        while chunk := pipe.read():
            got += len(chunk)
        seconds = time.perf_counter() - start
    finally:
        pipe.close()
    site.settle(path, device_before)
    server = site.server_cpu(path) - server
    chain = server + site.device_cpu() - device + reaped_cpu() - client
    return Bulk(got / seconds / 1e6, got == size, server, chain, placement)


def reaped_cpu() -> float:
    """CPU seconds of this program's children that ended (the ssh clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- which worker holds which connection --------------------------------------

def tcp_ports() -> dict[int, tuple[int, int]]:
    """Socket inode -> (local port, remote port) of every TCP socket on the machine."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                table[int(fields[9])] = (local, remote)
    return table


def socket_inodes(pid: int) -> set[int]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    found.add(int(link[8:-1]))
    return found


def worker_of(site: Site, table: dict[int, tuple[int, int]], client: int) -> str:
    """The hub worker (w0 = the twistd process) holding the SSH connection that
    `client` (or a process it started, as `ssh -J` does) made to the hub."""
    mine = {table[i][0] for pid in (client, *descendants(client))
            for i in socket_inodes(pid) if table.get(i, (0, 0))[1] == site.hub.port}
    for index, pid in enumerate(site.hub.pids()[:site.workers]):
        if any(table.get(i, (0, 0))[0] == site.hub.port and table[i][1] in mine
               for i in socket_inodes(pid)):
            return f"w{index}"
    return "w?"


def where(site: Site, client: int) -> str:
    """Which workers carry an operator's connection and the device's tunnel."""
    if site.workers == 1:
        return ""
    table = tcp_ports()
    assert site.tunnel.proc is not None
    return (f"operator {worker_of(site, table, client)}, "
            f"device {worker_of(site, table, site.tunnel.proc.pid)}")


def measure(site: Site, path: str, args: argparse.Namespace, result: Result,
            log: Path) -> None:
    if args.quiet_wait > 0:
        result.load_before.append(round(wait_quiet(args.quiet_below, args.quiet_wait), 2))
    name = f"gateway-w{site.workers}-{path}-{len(result.bulk_mb_per_s)}"
    rtts, cpu = echo(site, path, args.round_trips, log,
                     args.profile / f"{name}-echo" if args.profile and path in PEERS else None)
    result.rtt_us += rtts
    result.echo_cpu_us.append(round(cpu * 1e6 / args.round_trips, 1))
    spies = [PySpy(pid, args.profile / f"{name}-{i}.txt")
             for i, pid in enumerate(site.hub.pids())] if args.profile and path in PEERS else []
    try:
        done = bulk(site, path, args.size * MIB, log)
    finally:
        for spy in spies:
            spy.close()
    result.bulk_mb_per_s.append(round(done.mb_per_s, 1))
    result.bulk_ok = result.bulk_ok and done.complete
    result.server_cpu_ms_per_mib.append(round(done.server_cpu_s * 1000 / args.size, 3))
    result.chain_cpu_ms_per_mib.append(round(done.chain_cpu_s * 1000 / args.size, 3))
    if done.placement:
        result.placement.append(done.placement)
    s = result.summary()
    print(f"  w{site.workers} {path:11} p50 {s['p50_us']:7.0f} us  p99 {s['p99_us']:7.0f} us  "
          f"echo CPU {result.echo_cpu_us[-1]:5.0f} us  "
          f"bulk {done.mb_per_s:6.0f} MB/s  {done.server_cpu_s * 1000 / args.size:5.2f} ms/MiB  "
          f"chain {done.chain_cpu_s * 1000 / args.size:5.2f}"
          f"{'' if done.complete else '  SHORT'}  {done.placement}", file=sys.stderr, flush=True)


# -- the site ----------------------------------------------------------------

@contextlib.contextmanager
def site(workdir: Path, workers: int) -> Iterator[Site]:
    """Hub, device sshd, its call-home tunnels to the hub and the rendezvous sshd,
    approval and operator alice; always stopped."""
    with contextlib.ExitStack() as stack:
        hub = HubProcess(workdir, extra=["--workers", str(workers)], port_range=port_range())
        stack.callback(hub.close)
        hub.start()
        # Every worker listening before the device calls: it may land on any of them.
        wait_for(lambda: hub.log_text().count("callhomehub SSH listening") >= workers, 30,
                 "every worker to listen")
        alice = make_key(workdir / "alice", "alice")
        login = make_key(workdir / "rendezvous_key", "rendezvous")
        try:
            device, tunnel = approved_device(stack, workdir, hub, [alice, login])
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nhub log: {hub.log_text()[-3000:]}") from e
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "*")
        rendezvous = Rendezvous(stack, workdir, device, workdir / "device_key", login, [alice])
        yield Site(ssh_config(workdir, alice), hub, device, tunnel, rendezvous, workers)


def ssh_config(workdir: Path, key: Path) -> Path:
    """One config for both hops (`-J` passes `-F` on to the jump process)."""
    config = workdir / "ssh_config"
    config.write_text(
        f"Host *\n  BatchMode yes\n  IdentitiesOnly yes\n  IdentityFile {key}\n"
        "  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  LogLevel ERROR\n"
        "  Compression no\n  ConnectTimeout 10\n")
    return config


# -- the program -------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--round-trips", type=int, default=2000,
                   help="echo round trips per path and repeat (default 2000)")
    p.add_argument("--size", type=int, default=128, help="MiB of bulk output (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="runs per path (default 3)")
    p.add_argument("--workers", default="1,2",
                   help="comma-separated hub --workers counts, a fresh hub (and the sshd "
                        "paths again) for each (default 1,2)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy every hub process during the hub paths' echo and bulk into DIR")
    p.add_argument("--quick", action="store_true", help="200 round trips, 16 MiB, 1 run")
    p.add_argument("--full", action="store_true", help="10000 round trips, 512 MiB, 3 runs")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.round_trips, args.size, args.repeat = 200, 16, 1
        args.quiet_wait = min(args.quiet_wait, 2.0)
    elif args.full:
        args.round_trips, args.size, args.repeat = 10000, 512, 3
    args.workers = [int(v) for v in str(args.workers).split(",") if v]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    log = workdir / "ssh.log"
    results = []
    for workers in args.workers:
        block = workdir / f"w{workers}"
        block.mkdir()
        with site(block, workers) as s:
            by_path = {path: Result(path, workers) for path in PATHS}
            for repeat in range(args.repeat):
                for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:
                    measure(s, path, args, by_path[path], log)
        results += by_path.values()
    return results


def ceiling(chain_ms_per_mib: float) -> float:
    """MB/s the machine's cores could carry, were the path's processes the only work."""
    cores = os.cpu_count() or 1
    return cores * 1000 / chain_ms_per_mib * MIB / 1e6 if chain_ms_per_mib else 0.0


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(results: list[Result]) -> str:
    lines = []
    for workers in sorted({r.workers for r in results}):
        block = [r for r in results if r.workers == workers]
        lines += block_table(block, workers)
    return "\n".join(lines)


def block_table(results: list[Result], workers: int) -> list[str]:
    """One hub's paths and the sshd peers measured beside them."""
    by = {r.path: r.summary() for r in results}
    direct = by["direct"]
    lines = [f"hub --workers {workers}",
             f"{'path':11} {'p50 us':>8} {'p99 us':>8} {'added p50':>10} {'added p99':>10} "
             f"{'echo CPU us':>11} {'bulk MB/s':>10} {'vs direct':>9} {'ms/MiB':>7} "
             f"{'chain':>6} {'ceiling':>8}"]
    for r in results:
        s = by[r.path]
        added = r.path != "direct"
        lines.append(
            f"{r.path:11} {s['p50_us']:8.0f} {s['p99_us']:8.0f} "
            f"{s['p50_us'] - direct['p50_us'] if added else 0:10.0f} "
            f"{s['p99_us'] - direct['p99_us'] if added else 0:10.0f} "
            f"{s['echo_cpu_us']:11.0f} {s['bulk_mb_per_s']:10.0f} "
            f"{ratio(s['bulk_mb_per_s'], direct['bulk_mb_per_s']):>9} "
            f"{s['server_cpu_ms_per_mib'] if added else 0:7.2f} "
            f"{s['chain_cpu_ms_per_mib']:6.2f} {ceiling(s['chain_cpu_ms_per_mib']):8.0f}"
            f"{'' if r.bulk_ok else '  SHORT'}")
    lines.append(f"{'hub / sshd':21} {'bulk MB/s':>9} {'p50':>6} {'p99':>6} {'ms/MiB':>7} "
                 f"{'echo CPU':>8}")
    for hub, sshd in PEERS.items():
        h, o = by[hub], by[sshd]
        lines.append(f"{hub + ' / ' + sshd:21} {ratio(h['bulk_mb_per_s'], o['bulk_mb_per_s']):>9} "
                     f"{ratio(h['p50_us'], o['p50_us']):>6} {ratio(h['p99_us'], o['p99_us']):>6} "
                     f"{ratio(h['server_cpu_ms_per_mib'], o['server_cpu_ms_per_mib']):>7} "
                     f"{ratio(h['echo_cpu_us'], o['echo_cpu_us']):>8}")
    lines += [f"{r.path} bulk placements: {'; '.join(r.placement)}"
              for r in results if r.placement]
    return [*lines, ""]


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """hub / sshd per pair and worker count, for the JSON document."""
    out = {}
    for workers in sorted({r.workers for r in results}):
        by = {r.path: r.summary() for r in results if r.workers == workers}
        for hub, sshd in PEERS.items():
            out[f"{hub}-w{workers}"] = {
                key: round(by[hub][key] / by[sshd][key], 3) if by[sshd][key] else 0.0
                for key in ("bulk_mb_per_s", "p50_us", "p99_us", "server_cpu_ms_per_mib",
                            "echo_cpu_us")}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    with tempfile.TemporaryDirectory(prefix="callhomehub-gateway-") as tmp:
        source = use_hub_source(args.hub_source, Path(tmp))
        results = run(args, Path(tmp))
    print(table(results))
    if args.json:
        write_doc(args.json, "gateway", {
            "round_trips": args.round_trips, "size_mib": args.size, "repeat": args.repeat,
            "workers": args.workers, "machine": machine_info(), **source,
            "results": [{**asdict(r, filter=lambda a, v: a.name != "rtt_us"),
                         "per_run": {k: getattr(r, k) for k in PER_RUN}, **r.summary()}
                        for r in results],
            "hub_over_sshd": ratios(results)})
    return 0 if all(r.bulk_ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
