"""Added latency and bulk output of the console gateway, against going straight to the device.

    .venv/bin/python bench/gateway.py [--round-trips N] [--size MiB] [--repeat R]
                                      [--quick | --full] [--json FILE]

Setup as an operator meets it: a throwaway `sshd` stands for the device and
authorizes the hub's management key and alice's key; the device calls home
with `ssh -N -R 0:127.0.0.1:SSHDPORT cms@hub`; `callhomehub approve bench`
pins its host key; `callhomehub user add alice --allow '*'`. Three paths to
the same device sshd, each with the OpenSSH client (no pty, pipes):

- direct:   ssh -p SSHDPORT root@127.0.0.1 CMD
- gateway:  ssh -p HUBPORT alice:bench@127.0.0.1 CMD   (the hub logs in to the device itself)
- jump:     ssh -J alice@127.0.0.1:HUBPORT root@bench CMD   (the hub only relays)

Echo: one long-lived `cat` session per path; write a short line, wait for its
echo, N times; p50/p99 of the round trips. Bulk: `head -c SIZE /dev/zero`,
MB/s from the first byte to EOF. Paths alternate (order flipped every repeat).
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
from common import SSH, machine_info, make_key, stop_process, tree_cpu, wait_quiet
from peers import DeviceSSHD, HubProcess, approved_device
from runner import add_common_options, install_sigterm, percentile, use_hub_source, write_doc

PATHS = ("direct", "gateway", "jump")
MIB = 1 << 20
IO_TIMEOUT = 60.0


@define(frozen=True)
class Site:
    """Everything a path needs: the ssh config, the ports, whose CPU to charge."""

    config: Path
    hub: HubProcess
    device: DeviceSSHD

    def command(self, path: str, remote: str) -> list[str]:
        base = [SSH, "-F", str(self.config), "-T"]
        if path == "direct":
            return [*base, "-p", str(self.device.port), "root@127.0.0.1", remote]
        if path == "gateway":
            return [*base, "-p", str(self.hub.port), "alice:bench@127.0.0.1", remote]
        return [*base, "-J", f"alice@127.0.0.1:{self.hub.port}", "root@bench", remote]


@define
class Result:
    path: str
    rtt_us: list[float] = field(factory=list)
    bulk_mb_per_s: list[float] = field(factory=list)
    bulk_ok: bool = True
    hub_cpu_ms_per_mib: list[float] = field(factory=list)
    load_before: list[float] = field(factory=list)

    def summary(self) -> dict[str, float]:
        return {"p50_us": round(percentile(self.rtt_us, 50), 1),
                "p90_us": round(percentile(self.rtt_us, 90), 1),
                "p99_us": round(percentile(self.rtt_us, 99), 1),
                "max_us": round(max(self.rtt_us, default=0.0), 1),
                "bulk_mb_per_s": statistics.median(self.bulk_mb_per_s)
                if self.bulk_mb_per_s else 0.0}


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
        stop_process(self.proc)  # type: ignore[arg-type]
        with contextlib.suppress(OSError):
            os.close(self.rfd)


def echo(site: Site, path: str, count: int, log: Path) -> list[float]:
    """`count` round trips of a 9-byte line through `cat` on the device, in microseconds."""
    pipe = Pipe(site.command(path, "cat"), log)
    try:
        os.write(pipe.wfd, b"warmup\n")
        pipe.expect(b"warmup\n")
        rtts = []
        for i in range(count):
            line = b"%08d\n" % i
            start = time.perf_counter()
            os.write(pipe.wfd, line)
            pipe.expect(line)
            rtts.append((time.perf_counter() - start) * 1e6)
        return rtts
    finally:
        pipe.close()


def bulk(site: Site, path: str, size: int, log: Path) -> tuple[float, bool, float]:
    """(MB/s from first byte to EOF, all bytes arrived, hub CPU seconds meanwhile)."""
    pipe = Pipe(site.command(path, f"head -c {size} /dev/zero"), log)
    try:
        got = len(pipe.read())
        start = time.perf_counter()
        cpu = sum(tree_cpu(site.hub.pids()))
        while chunk := pipe.read():
            got += len(chunk)
        seconds = time.perf_counter() - start
        return got / seconds / 1e6, got == size, sum(tree_cpu(site.hub.pids())) - cpu
    finally:
        pipe.close()


def measure(site: Site, path: str, args: argparse.Namespace, result: Result,
            log: Path) -> None:
    if args.quiet_wait > 0:
        result.load_before.append(round(wait_quiet(args.quiet_below, args.quiet_wait), 2))
    result.rtt_us += echo(site, path, args.round_trips, log)
    mb_s, ok, cpu = bulk(site, path, args.size * MIB, log)
    result.bulk_mb_per_s.append(round(mb_s, 1))
    result.bulk_ok = result.bulk_ok and ok
    result.hub_cpu_ms_per_mib.append(round(cpu * 1000 / args.size, 3))
    s = result.summary()
    print(f"  {path:8} p50 {s['p50_us']:7.0f} us  p99 {s['p99_us']:7.0f} us  "
          f"bulk {mb_s:6.0f} MB/s{'' if ok else '  SHORT'}", file=sys.stderr, flush=True)


# -- the site ----------------------------------------------------------------

@contextlib.contextmanager
def site(workdir: Path) -> Iterator[Site]:
    """Hub, device sshd, its call-home tunnel, approval and operator alice; always stopped."""
    with contextlib.ExitStack() as stack:
        hub = HubProcess(workdir)
        stack.callback(hub.close)
        hub.start()
        alice = make_key(workdir / "alice", "alice")
        device, _ = approved_device(stack, workdir, hub, [alice])
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "*")
        yield Site(ssh_config(workdir, alice), hub, device)


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
    p.add_argument("--quick", action="store_true", help="200 round trips, 16 MiB, 1 run")
    p.add_argument("--full", action="store_true", help="10000 round trips, 512 MiB, 3 runs")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.round_trips, args.size, args.repeat = 200, 16, 1
        args.quiet_wait = min(args.quiet_wait, 2.0)
    elif args.full:
        args.round_trips, args.size, args.repeat = 10000, 512, 3
    return args


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    log = workdir / "ssh.log"
    with site(workdir) as s:
        results = {path: Result(path) for path in PATHS}
        for repeat in range(args.repeat):
            for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:
                measure(s, path, args, results[path], log)
    return list(results.values())


def table(results: list[Result]) -> str:
    by = {r.path: r.summary() for r in results}
    direct = by["direct"]
    lines = [f"{'path':8} {'p50 us':>8} {'p99 us':>8} {'added p50':>10} {'added p99':>10} "
             f"{'bulk MB/s':>10} {'vs direct':>9}"]
    for r in results:
        s = by[r.path]
        added = r.path != "direct"
        lines.append(
            f"{r.path:8} {s['p50_us']:8.0f} {s['p99_us']:8.0f} "
            f"{s['p50_us'] - direct['p50_us'] if added else 0:10.0f} "
            f"{s['p99_us'] - direct['p99_us'] if added else 0:10.0f} "
            f"{s['bulk_mb_per_s']:10.0f} "
            f"{s['bulk_mb_per_s'] / direct['bulk_mb_per_s'] if direct['bulk_mb_per_s'] else 0:9.2f}"
            f"{'' if r.bulk_ok else '  SHORT'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    with tempfile.TemporaryDirectory(prefix="callhomehub-gateway-") as tmp:
        source = use_hub_source(args.hub_source, Path(tmp))
        results = run(args, Path(tmp))
    print(table(results))
    if args.json:
        by = {r.path: r.summary() for r in results}
        write_doc(args.json, "gateway", {
            "round_trips": args.round_trips, "size_mib": args.size, "repeat": args.repeat,
            "machine": machine_info(), **source,
            "results": [{**asdict(r, filter=lambda a, v: a.name != "rtt_us"), **r.summary()}
                        for r in results],
            "summary": {**by, "added_p50_us": {p: by[p]["p50_us"] - by["direct"]["p50_us"]
                                               for p in ("gateway", "jump")},
                        "added_p99_us": {p: by[p]["p99_us"] - by["direct"]["p99_us"]
                                         for p in ("gateway", "jump")}}})
    return 0 if all(r.bulk_ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
