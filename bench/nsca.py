"""NSCA intake rate: the hub (in-tunnel and `--nsca` TCP) vs Debian's nsca daemon.

    .venv/bin/python bench/nsca.py [--senders K] [--results M] [--repeat R]
                                   [--quick | --full] [--json FILE]

The same load goes to every path: K `send_nsca` processes started at once,
each sending M service results in one connection (ETB-separated records,
encryption method 1 with a password, as Debian ships it). A run is timed from
starting the senders until the last result is *stored*: rows in the hub's
`results` table (what `callhomehub status` reads), lines in nsca's command
file. Paths:

- hub-tunnel:   send_nsca -> device's `ssh -N -L PORT:localhost:5667 cms@hub` -> in-tunnel intake
- hub-tcp:      send_nsca -> the hub's `--nsca tcp:...` listener
- nsca-daemon:  send_nsca -> `nsca -f --daemon` (Debian's default: a process per connection)
- nsca-single:  send_nsca -> `nsca -f --single` (one process, select loop)

The hub also writes every result to a `--command-file` (a regular file), as
nsca does, so both do at least the same work. Paths alternate within each
repeat (order flipped every repeat); the median rate is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from attrs import asdict, define, field

# Run as a script: bench/ is on sys.path.
from common import (
    CLK_TCK,
    SSH,
    PySpy,
    client_options,
    listening_ports,
    machine_info,
    make_key,
    port_range,
    server_cpu,
    stop_process,
    wait_for,
    wait_quiet,
)
from peers import SEND_NSCA, HubProcess, NscaDaemon
from perfrecord import PerfRecord
from runner import add_common_options, install_sigterm, use_hub_source, write_doc

PASSWORD = "bench-nsca-password"  # noqa: S105 - a throwaway daemon's, for one run
METHOD = 1
PATHS = ("hub-tunnel", "hub-tcp", "nsca-daemon", "nsca-single")


@define(frozen=True)
class Target:
    """Where senders connect and how to count what got stored there."""

    name: str
    port: int
    stored: Callable[[], int]
    server_pids: Callable[[], list[int]]


@define
class Result:
    path: str
    results: int = 0
    rates: list[float] = field(factory=list)
    seconds: list[float] = field(factory=list)
    senders_done: list[float] = field(factory=list)  # when the last send_nsca exited
    server_cpu_s: list[float] = field(factory=list)
    # The server's CPU seconds per run: its main thread (the hub's reactor) and
    # the others (the hub's registry thread), to tell the reactor's share from the store's.
    thread_cpu_s: list[dict[str, float]] = field(factory=list)
    load_before: list[float] = field(factory=list)
    failures: list[str] = field(factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


# -- load --------------------------------------------------------------------

def records(sender: int, count: int, tag: str) -> bytes:
    """`count` service results from host h<sender>, one service each, ETB-separated."""
    return b"".join(f"h{sender}\tsvc{i}\t{i % 4}\t{tag} result {i} of sender {sender}\x17"
                    .encode() for i in range(count))


def send_cfg(workdir: Path) -> Path:
    cfg = workdir / "send_nsca.cfg"
    cfg.write_text(f"password={PASSWORD}\nencryption_method={METHOD}\n")
    return cfg


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds (utime + stime) of the main threads of `pids` and of their other threads
    (Python does not name its threads for the kernel)."""
    by_kind = {"main": 0.0, "others": 0.0}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                kind = "main" if task.name == str(pid) else "others"
                by_kind[kind] += sum(int(v) for v in fields[11:13]) / CLK_TCK
    return by_kind


def blast(target: Target, cfg: Path, senders: int, per_sender: int, tag: str,
          timeout: float) -> tuple[float, float, list[str]]:
    """Run the senders; (seconds until all stored, seconds until senders exited, errors)."""
    inputs = [records(k, per_sender, tag) for k in range(senders)]
    goal = target.stored() + senders * per_sender
    start = time.perf_counter()
    procs = [subprocess.Popen([SEND_NSCA, "-H", "127.0.0.1", "-p", str(target.port),
                               "-c", str(cfg), "-to", "60"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(senders)]
    errors: list[str] = []
    try:
        for proc, data in zip(procs, inputs, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(data)
            proc.stdin.close()
        for proc in procs:
            out = proc.stdout.read() if proc.stdout else b""
            if proc.wait(timeout) != 0:
                errors.append(out.decode(errors="replace").strip()[-200:])
        sent = time.perf_counter() - start
        wait_for(lambda: target.stored() >= goal, timeout, f"{target.name} to store results")
        return time.perf_counter() - start, sent, errors
    finally:
        for proc in procs:
            stop_process(proc)


def measure(target: Target, cfg: Path, args: argparse.Namespace, repeat: int,
            result: Result) -> None:
    if args.quiet_wait > 0:
        result.load_before.append(round(wait_quiet(args.quiet_below, args.quiet_wait), 2))
    pids = target.server_pids()
    cpu, threads = server_cpu(pids), thread_cpu(pids)
    profiled = args.profile if target.name.startswith("hub") else None
    spies: list[PySpy | PerfRecord] = [
        PySpy(pid, profiled / f"{target.name}-r{repeat}-{i}.txt")
        for i, pid in enumerate(pids)] if profiled else []
    if args.perf and target.name.startswith("hub"):
        spies += [PerfRecord(pid, args.perf / f"{target.name}-r{repeat}-{i}.data")
                  for i, pid in enumerate(pids)]
    try:
        seconds, sent, errors = blast(target, cfg, args.senders, args.results,
                                      f"r{repeat}", args.timeout)
    except TimeoutError as e:
        result.failures.append(str(e))
        return
    finally:
        for spy in spies:
            spy.close()
    result.server_cpu_s.append(round(server_cpu(pids) - cpu, 3))
    total = args.senders * args.results
    by_thread = {name: round(spent - threads.get(name, 0.0), 3)
                 for name, spent in thread_cpu(pids).items()}
    result.thread_cpu_s.append(by_thread)
    shares = ", ".join(f"{name} {spent * 1e6 / total:.0f}" for name, spent in by_thread.items())
    result.results = total
    result.seconds.append(round(seconds, 3))
    result.senders_done.append(round(sent, 3))
    result.rates.append(round(total / seconds, 1))
    result.failures += errors
    print(f"  {target.name:12} {total} results in {seconds:.2f}s = {total / seconds:,.0f}/s"
          f" (CPU us/result, threads: {shares})"
          f"{'  ERRORS ' + repr(errors[:1]) if errors else ''}", file=sys.stderr, flush=True)


# -- the servers -------------------------------------------------------------

def hub_results(db: Path) -> Callable[[], int]:
    """How many results the hub has stored so far.

    MAX(id), not COUNT(*): the rowid grows by one per stored result (history
    pruning deletes only the oldest rows of a check), and reading it is one
    index probe, where COUNT(*) scans the whole table 20 times a second
    (measured: it cost the hub about a quarter of its rate)."""
    def count() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=5)) as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM results").fetchone()[0])
    return count


def local_forward(hub: HubProcess, key: Path, workdir: Path) -> tuple[subprocess.Popen[bytes],
                                                                    int]:
    """The device's `ssh -N -L PORT:localhost:5667 cms@hub`, up and listening."""
    port = pick_local_port()
    log = open(workdir / "ssh-L.log", "wb")
    proc = subprocess.Popen(
        [SSH, *client_options(hub.port), "-N", "-o", "BatchMode=yes",
         "-o", "ExitOnForwardFailure=yes", "-i", str(key),
         "-L", f"127.0.0.1:{port}:localhost:5667", "cms@127.0.0.1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    log.close()

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ssh -L exited: {(workdir / 'ssh-L.log').read_text()}")
        return port in listening_ports(port, port)
    wait_for(up, 30, "the device's local forward")
    return proc, port


def pick_local_port() -> int:
    low, high = (int(v) for v in port_range(1).split("-"))
    busy = listening_ports(low, high)
    return next(p for p in range(high, low, -1) if p not in busy)


@contextlib.contextmanager
def targets(workdir: Path, paths: list[str]) -> Iterator[list[Target]]:
    """Every path's server, up for the whole run and always stopped."""
    with contextlib.ExitStack() as stack:
        found: list[Target] = []
        if {"hub-tunnel", "hub-tcp"} & set(paths):
            found += hub_targets(stack, workdir, paths)
        for mode in ("daemon", "single"):
            if f"nsca-{mode}" in paths:
                daemon = NscaDaemon(workdir / f"nsca-{mode}", PASSWORD, METHOD, f"--{mode}")
                stack.callback(daemon.close)
                daemon.start()
                found.append(Target(f"nsca-{mode}", daemon.port, daemon.stored,
                                    lambda d=daemon: [d.proc.pid] if d.proc else []))
        yield sorted(found, key=lambda t: paths.index(t.name))


def hub_targets(stack: contextlib.ExitStack, workdir: Path, paths: list[str]) -> list[Target]:
    # strict_host stays on (the default): the tunnel's node may report for the
    # senders' hosts h0, h1, ... as [nsca.hosts] allows.
    config = (f'[nsca]\npassword = "{PASSWORD}"\nencryption = {METHOD}\nmax_age = 30\n'
              '[nsca.hosts]\nbench = ["h*"]\n')
    # The hub never creates a command file (a core makes its FIFO); without one it
    # queued, dropped and logged instead of writing, unlike the nsca daemon.
    (workdir / "hub.cmd").touch()
    hub = HubProcess(workdir, config=config, extra=[
        "--nsca", "tcp:0:interface=127.0.0.1", "--command-file", str(workdir / "hub.cmd")])
    stack.callback(hub.close)
    hub.start()
    count = hub_results(hub.data / "hub.sqlite3")
    found = []
    if "hub-tunnel" in paths:
        key = make_key(workdir / "device_key", "bench")
        hub.register(key, workdir)
        # The intake keeps only an approved node's results (a pending one's are dropped).
        hub.cli("approve", "bench")
        proc, port = local_forward(hub, key, workdir)
        stack.callback(stop_process, proc)
        found.append(Target("hub-tunnel", port, count, hub.pids))
    if "hub-tcp" in paths:
        found.append(Target("hub-tcp", hub.ports["NSCA"], count, hub.pids))
    return found


# -- the program -------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--senders", type=int, default=4, help="parallel send_nsca (default 4)")
    p.add_argument("--results", type=int, default=2500,
                   help="results per send_nsca connection (default 2500)")
    p.add_argument("--repeat", type=int, default=3, help="runs per path (default 3)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated: %(default)s")
    p.add_argument("--quick", action="store_true", help="2 senders x 200 results, 1 run")
    p.add_argument("--full", action="store_true", help="8 senders x 10000 results, 3 runs")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run at most")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy the hub during its runs into DIR (hub-*-rN-I.txt; "
                   "bench/stacks.py summarizes)")
    p.add_argument("--perf", type=Path, metavar="DIR",
                   help="record the hub's CPU time with Linux `perf record` into DIR "
                   "(hub-*-rN-I.data; `perf report -i FILE --sort dso,sym`)")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.senders, args.results, args.repeat = 2, 200, 1
        args.quiet_wait = min(args.quiet_wait, 2.0)
    elif args.full:
        args.senders, args.results, args.repeat = 8, 10000, 3
    args.paths = [s for s in args.paths.split(",") if s]
    for recorded in (args.profile, args.perf):
        if recorded:
            recorded.mkdir(parents=True, exist_ok=True)
    if not set(args.paths) <= set(PATHS):
        p.error(f"--paths takes {', '.join(PATHS)}")
    return args


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    cfg = send_cfg(workdir)
    with targets(workdir, args.paths) as found:
        results = {t.name: Result(t.name) for t in found}
        for repeat in range(args.repeat):
            for target in found if repeat % 2 == 0 else found[::-1]:
                measure(target, cfg, args, repeat, results[target.name])
    return list(results.values())


def table(results: list[Result]) -> str:
    by = {r.path: r for r in results}
    ref = by.get("nsca-daemon")
    single = by.get("nsca-single")
    lines = [f"{'path':12} {'results':>8} {'results/s':>10} {'vs nsca --daemon':>16} "
             f"{'vs nsca --single':>16} {'server CPU us/result':>20} failures"]
    for r in results:
        cpu = (statistics.median(r.server_cpu_s) * 1e6 / r.results
               if r.server_cpu_s and r.results else 0)
        lines.append(f"{r.path:12} {r.results:8} {r.median:10,.0f} {ratio(r, ref):>16} "
                     f"{ratio(r, single):>16} {cpu:20.0f} {len(r.failures)}")
    return "\n".join(lines)


def ratio(r: Result, ref: Result | None) -> str:
    return f"{r.median / ref.median:.2f}" if ref and ref.median else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    with tempfile.TemporaryDirectory(prefix="callhomehub-nsca-") as tmp:
        source = use_hub_source(args.hub_source, Path(tmp))
        results = run(args, Path(tmp))
    print(table(results))
    if args.json:
        write_doc(args.json, "nsca", {
            "senders": args.senders, "results_per_sender": args.results,
            "repeat": args.repeat, "encryption_method": METHOD,
            "machine": machine_info(), **source, "results": [asdict(r) for r in results],
            "summary": {r.path: r.median for r in results}})
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
