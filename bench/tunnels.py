"""Idle tunnels at scale: hub memory per tunnel, bring-up rate, and the reconnect storm.

    .venv/bin/python bench/tunnels.py [--n 1000[,3000,...]] [--sshd-max 500]
                                      [--quick | --full] [--json FILE]

For each N: N device keys (ed25519) written straight into a fresh hub's
registry (not through `ssh cms@hub register`: that would take ~N x 0.3 s),
the hub started, then ONE load-generator process (`tunnel_load.py`, asyncssh, or
with `--generator libssh2` `tunnel_load_c.py`, libssh2's C handshake) connects
every device as `cms` with its key and asks for one reverse forward with port 0,
at most --concurrency handshakes at once. Measured:

- bring-up: seconds until all N forwards are up, handshakes/s, hub CPU per handshake;
- idle memory: hub (RSS_N - RSS_0) / N and the same for PSS, open fds, settled
  a few seconds after the last forward;
- the reconnect storm: SIGTERM the hub, start it again on the same SSH port;
  every device reconnects after a random 0..--jitter s and retries until its
  forward is back. Seconds from the new hub's start (and from the SIGTERM)
  until all N forwards are back, and how many devices got a different port
  than before (must be 0), checked by the generator and by `callhomehub nodes`.

With `--workers 1,2` the hub runs once per worker count (`twistd callhomehub --workers W`,
processes sharing the SSH port) and the storm times are compared: the line
`storm ratio` is the 1-worker restore time over the W-worker one (> 1: faster).

The same bring-up and idle figures for OpenSSH sshd (`GatewayPorts yes`, the N
public keys in `authorized_keys`, user root) for N up to --sshd-max: memory
is the PSS summed over sshd's per-connection processes, divided by N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from attrs import asdict, define

# Run as a script: bench/ is on sys.path.
from common import (
    PySpy,
    cpu_seconds,
    descendants,
    machine_info,
    port_range,
    vm_rss_kib,
    wait_for,
    wait_quiet,
)
from fleet import GENERATORS, Generator, make_keys, register_all
from peers import DeviceSSHD, HubProcess, nofile_limit
from runner import add_common_options, install_sigterm, use_hub_source, write_doc


@define
class Outcome:
    server: str
    n: int
    workers: int = 1
    up: int = 0
    bring_up_s: float = 0.0
    handshakes_per_s: float = 0.0
    server_cpu_ms_per_handshake: float = 0.0
    rss0_kib: int = 0
    rss_kib: int = 0
    pss0_kib: int = 0
    pss_kib: int = 0
    rss_per_tunnel_kib: float = 0.0
    pss_per_tunnel_kib: float = 0.0
    fds0: int = 0
    fds: int = 0
    generator_rss_kib: int = 0
    generator_cpu_ms_per_handshake: float = 0.0
    storm_server_cpu_s: float = 0.0
    storm_generator_cpu_s: float = 0.0
    register_s: float = 0.0
    storm_stop_s: float = 0.0      # SIGTERM until the old hub exited
    storm_listen_s: float = 0.0    # new hub started until it listened
    storm_restore_s: float = 0.0   # new hub started until all N forwards were back
    storm_total_s: float = 0.0     # SIGTERM until all N forwards were back
    storm_up: int = 0
    storm_moved: int = -1          # devices whose port changed (the generator's count)
    storm_ports_same: int = -1     # devices with the same port in `callhomehub nodes`
    storm_online: int = -1         # nodes online in `callhomehub nodes` once all are back
    storm_handshakes_per_s: float = 0.0
    storm_failures: int = 0
    nofile_limit: int = 0
    notes: str = ""


# -- /proc probes ------------------------------------------------------------

def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def summed(probe: Any, pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += probe(pid)
    return total


def settle(pids: list[int], seconds: float, idle_below: float = 0.05) -> None:
    """Wait until these processes use less than `idle_below` of a core (at most `seconds`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = sum(summed_cpu(pid) for pid in pids)
        time.sleep(1.0)
        if sum(summed_cpu(pid) for pid in pids) - before < idle_below:
            return


def summed_cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


# -- one bring-up ------------------------------------------------------------

def wait_all_up(gen: Generator, since: float, timeout: float, stall: float
                ) -> dict[str, Any] | None:
    """The first all-up report after `since`; None after `timeout`, or once the number
    of forwards up has not grown for `stall` seconds (e.g. the hub is out of fds)."""
    deadline = time.monotonic() + timeout
    best, grew = -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - grew < stall:
        done = gen.wait(lambda e: e["event"] == "all-up" and e["t"] > since, 2.0)
        if done is not None:
            return done
        up = int(gen.latest().get("up", 0))
        if up > best:
            best, grew = up, time.monotonic()
    return None


def bring_up(gen: Generator, outcome: Outcome, cpu: Any, timeout: float, stall: float
             ) -> dict[str, Any]:
    """Wait for all N forwards; fill bring-up figures (partial ones on timeout)."""
    start = gen.wait(lambda e: e["event"] == "start", 120)
    if start is None:
        raise RuntimeError("the load generator did not start")
    cpu0, gen0 = cpu(), summed_cpu(gen.proc.pid)
    done = wait_all_up(gen, start["t"], timeout, stall)
    last = done or gen.latest()
    outcome.up = int(last.get("up", 0))
    seconds = last["t"] - start["t"] if last else 0.0
    outcome.bring_up_s = round(seconds, 2)
    outcome.handshakes_per_s = round(outcome.up / seconds, 1) if seconds else 0.0
    outcome.server_cpu_ms_per_handshake = round((cpu() - cpu0) * 1000 / max(1, outcome.up), 2)
    outcome.generator_cpu_ms_per_handshake = round(
        (summed_cpu(gen.proc.pid) - gen0) * 1000 / max(1, outcome.up), 2)
    if done is None:
        outcome.notes += (f"bring-up stopped after {seconds:.0f}s with {outcome.up}/"
                          f"{outcome.n} up; errors {last.get('errors')}. ")
    print(f"  {outcome.server}: {outcome.up}/{outcome.n} up in {seconds:.1f}s "
          f"({outcome.handshakes_per_s:.0f}/s)", file=sys.stderr, flush=True)
    return last


def idle_figures(outcome: Outcome, pids: list[int], gen: Generator, per: str) -> None:
    outcome.rss_kib = summed(vm_rss_kib, pids)
    outcome.pss_kib = summed(pss_kib, pids)
    outcome.fds = summed(open_fds, pids)
    outcome.generator_rss_kib = vm_rss_kib(gen.proc.pid)
    up = max(1, outcome.up)
    outcome.rss_per_tunnel_kib = round((outcome.rss_kib - outcome.rss0_kib) / up, 1)
    outcome.pss_per_tunnel_kib = round((outcome.pss_kib - outcome.pss0_kib) / up, 1)
    print(f"  {outcome.server}: {per} {outcome.rss_per_tunnel_kib:.1f} KiB RSS, "
          f"{outcome.pss_per_tunnel_kib:.1f} KiB PSS per tunnel; {outcome.fds} fds",
          file=sys.stderr, flush=True)


# -- the hub -----------------------------------------------------------------

def hub_run(workdir: Path, n: int, args: argparse.Namespace, workers: int = 1) -> Outcome:
    name = ("hub+keeper" if args.port_keeper else "hub") + (f"-w{workers}" if workers > 1 else "")
    outcome = Outcome(name, n, workers, nofile_limit=nofile_limit())
    keys = workdir / "keys.jsonl"
    publics = make_keys(keys, n)
    hub = HubProcess(workdir, port_range=port_range(n), backlog=args.backlog,
                     extra=["--keepalive", str(args.keepalive), "--workers", str(workers),
                            *(["--port-keeper"] if args.port_keeper else [])])
    gen: Generator | None = None
    try:
        outcome.register_s = round(register_all(hub.data / "hub.sqlite3", publics), 2)
        hub.start()
        wait_quiet(args.quiet_below, args.quiet_wait)
        settle(hub.pids(), 10)
        outcome.rss0_kib = summed(vm_rss_kib, hub.pids())
        outcome.pss0_kib = summed(pss_kib, hub.pids())
        outcome.fds0 = summed(open_fds, hub.pids())
        gen = Generator(hub.port, keys, "cms", args.concurrency, args.jitter,
                        args.backoff_max, args.storm_concurrency, workdir / "generator.log",
                        ["--asyncssh-defaults"] if args.asyncssh_defaults else [],
                        generator=args.generator)
        bring_up(gen, outcome, lambda: sum(map(summed_cpu, hub.pids())), args.timeout,
                 args.stall)
        settle(hub.pids(), 20)
        idle_figures(outcome, hub.pids(), gen, "(RSS_N - RSS_0)/N")
        if args.storm and outcome.up == n:
            storm(hub, gen, outcome, args)
    finally:
        if gen is not None:
            gen.close()
        hub.close()
        outcome.notes += log_errors(hub.data)
    return outcome


def log_errors(data: Path) -> str:
    """How often the hub's logs (all rotations) name running out of files or ports."""
    counts = dict.fromkeys(("Too many open files", "no free port left", "Unhandled Error"), 0)
    for log in data.glob("hub.log*"):
        text = log.read_text(errors="replace")
        for pattern in counts:
            counts[pattern] += text.count(pattern)
    found = ", ".join(f"{k!r} x{v}" for k, v in counts.items() if v)
    return f"hub log: {found}. " if found else ""


def registry_nodes(hub: HubProcess) -> list[dict[str, Any]]:
    return json.loads(hub.cli("nodes", "--json"))  # type: ignore[no-any-return]


def leases(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    return {node["name"]: node["leases"] for node in nodes}


def online_once_written(hub: HubProcess, expected: int, wait: float = 10.0
                        ) -> list[dict[str, Any]]:
    """The registry's nodes once `expected` of them are online there, or after
    `wait` seconds (the hub writes a login's online state off the reactor, so it
    may land just after the forward is back)."""
    deadline = time.monotonic() + wait
    while True:
        nodes = registry_nodes(hub)
        if sum(1 for n in nodes if n["online"]) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def storm(hub: HubProcess, gen: Generator, outcome: Outcome, args: argparse.Namespace) -> None:
    """SIGTERM the hub, start it again on the same port, time until all forwards are back."""
    before = leases(registry_nodes(hub))
    wait_quiet(args.quiet_below, args.quiet_wait)
    assert hub.proc is not None
    killed = time.monotonic()
    hub.proc.send_signal(signal.SIGTERM)
    hub.proc.wait(120)
    stopped = time.monotonic()
    hub.start(hub.port)
    listening = time.monotonic()
    cpu0, gen0 = sum(map(summed_cpu, hub.pids())), summed_cpu(gen.proc.pid)
    if args.profile:  # every worker, not only those started by the time the port answered
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: len(hub.pids()) >= outcome.workers, 10, "every worker")
    spies = [PySpy(pid, args.profile / f"storm-{outcome.server}-{outcome.n}-{i}.txt")
             for i, pid in enumerate(hub.pids())] if args.profile else []
    try:
        done = wait_all_up(gen, listening, args.timeout, args.stall)
    finally:
        for spy in spies:
            spy.close()
    last = done or gen.latest()
    outcome.storm_server_cpu_s = round(sum(map(summed_cpu, hub.pids())) - cpu0, 1)
    outcome.storm_generator_cpu_s = round(summed_cpu(gen.proc.pid) - gen0, 1)
    outcome.storm_stop_s = round(stopped - killed, 2)
    outcome.storm_listen_s = round(listening - stopped, 2)
    outcome.storm_restore_s = round(last["t"] - stopped, 2)
    outcome.storm_total_s = round(last["t"] - killed, 2)
    outcome.storm_up, outcome.storm_moved = int(last["up"]), int(last["moved"])
    outcome.storm_failures = int(last["failures"])
    outcome.storm_handshakes_per_s = round(
        outcome.storm_up / max(0.001, last["t"] - listening), 1)
    nodes = online_once_written(hub, outcome.storm_up)
    after = leases(nodes)
    outcome.storm_ports_same = sum(1 for name, fw in before.items()
                                   if fw and after.get(name) == fw)
    outcome.storm_online = sum(1 for n in nodes if n["online"])
    if done is None:
        outcome.notes += (f"storm: only {outcome.storm_up}/{outcome.n} back after "
                          f"{outcome.storm_restore_s:.0f}s; errors {last.get('errors')}. ")
    print(f"  hub storm: stop {outcome.storm_stop_s}s, listen {outcome.storm_listen_s}s, "
          f"all {outcome.storm_up} back {outcome.storm_restore_s}s after start "
          f"({outcome.storm_total_s}s after SIGTERM); moved {outcome.storm_moved}, "
          f"same in registry {outcome.storm_ports_same}, online there "
          f"{outcome.storm_online}; CPU hub "
          f"{outcome.storm_server_cpu_s}s, generator {outcome.storm_generator_cpu_s}s",
          file=sys.stderr, flush=True)


# -- OpenSSH sshd ------------------------------------------------------------

def sshd_run(workdir: Path, n: int, args: argparse.Namespace) -> Outcome:
    outcome = Outcome("sshd", n, nofile_limit=nofile_limit())
    keys = workdir / "keys.jsonl"
    publics = make_keys(keys, n)
    sshd = DeviceSSHD(workdir / "sshd", [line for _, line in publics],
                      f"MaxStartups {args.concurrency + 10}:30:{args.concurrency * 4 + 10}\n"
                      "LogLevel ERROR\nMaxAuthTries 6\n")
    gen: Generator | None = None
    try:
        sshd.start()
        assert sshd.proc is not None
        master = sshd.proc.pid
        wait_quiet(args.quiet_below, args.quiet_wait)
        outcome.rss0_kib = outcome.pss0_kib = 0   # per-connection processes only
        outcome.fds0 = open_fds(master)
        gen = Generator(sshd.port, keys, "root", args.concurrency, args.jitter,
                        args.backoff_max, args.storm_concurrency, workdir / "generator.log",
                        ["--asyncssh-defaults"] if args.asyncssh_defaults else [],
                        generator=args.generator)
        bring_up(gen, outcome, lambda: sum(summed_cpu(p) for p in descendants(master)),
                 args.timeout, args.stall)
        settle([master, *descendants(master)], 20)
        idle_figures(outcome, descendants(master), gen, "sum over per-connection processes / N:")
        outcome.notes += (f"{len(descendants(master))} per-connection processes; "
                          "memory and fds are theirs (the listener excluded). ")
    finally:
        if gen is not None:
            gen.close()
        sshd.close()
    return outcome


# -- the program -------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--n", default="1000", help="comma-separated device counts (default 1000)")
    p.add_argument("--sshd-max", type=int, default=500,
                   help="run sshd for min(N, this) devices; 0: no sshd (default 500)")
    p.add_argument("--concurrency", type=int, default=50,
                   help="handshakes at once during the first bring-up (default 50)")
    p.add_argument("--jitter", type=float, default=2.0,
                   help="a device reconnects after 0..S s, random (default 2)")
    p.add_argument("--storm-concurrency", type=int, default=200,
                   help="handshakes the generator keeps in flight during the storm (default "
                        "200, under the hub's [limits] max_unauthenticated 256; 0: unlimited, "
                        "then one Python generator spends most of its CPU on refused attempts)")
    p.add_argument("--backoff-max", type=float, default=60.0,
                   help="longest retry back-off of a device, s (default 60, as "
                        "device/callhome.sh)")
    p.add_argument("--asyncssh-defaults", action="store_true",
                   help="let asyncssh pick kex, host key and cipher (the hub then signs with "
                        "RSA and uses ML-KEM); default: what OpenSSH 9.2 picks")
    p.add_argument("--generator", choices=sorted(GENERATORS), default="asyncssh",
                   help="the devices' SSH client: asyncssh (tunnel_load.py, Python) or "
                        "libssh2 (tunnel_load_c.py, C handshakes)")
    p.add_argument("--backlog", type=int, default=0,
                   help="listen backlog of the hub's SSH endpoint (default: the hub's own)")
    p.add_argument("--keepalive", type=int, default=15, help="hub --keepalive (default 15)")
    p.add_argument("--port-keeper", action="store_true",
                   help="run the hub with --port-keeper (listeners in a helper process, "
                        "counted with the hub)")
    p.add_argument("--workers", default="1",
                   help="comma-separated hub --workers counts, one hub run each (default 1); "
                        "e.g. 1,2 prints the storm ratio")
    p.add_argument("--no-storm", dest="storm", action="store_false")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy each hub process during the storm into DIR (storm-*.txt; "
                   "bench/stacks.py summarizes)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds for a bring-up or a storm at most (default 120 + N/20)")
    p.add_argument("--stall", type=float, default=30.0,
                   help="give up when no forward came up for S seconds (default 30)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (hub logs, generator log)")
    p.add_argument("--quick", action="store_true", help="N=100")
    p.add_argument("--full", action="store_true", help="N=10000")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.quiet_wait = "100", min(args.quiet_wait, 2.0)
    elif args.full:
        args.n = "10000"
    args.n = [int(v) for v in str(args.n).split(",") if v]
    args.workers = [int(v) for v in str(args.workers).split(",") if v]
    return args


def run(args: argparse.Namespace, workdir: Path) -> list[Outcome]:
    outcomes = []
    for n in args.n:
        timeout = args.timeout or 120 + n / 20
        args_n = argparse.Namespace(**{**vars(args), "timeout": timeout})
        for workers in args.workers:
            hub_dir = workdir / f"hub-{n}-w{workers}"
            hub_dir.mkdir()
            outcomes.append(hub_run(hub_dir, n, args_n, workers))
        m = min(n, args.sshd_max)
        if m and not any(o.server == "sshd" and o.n == m for o in outcomes):
            sshd_dir = workdir / f"sshd-{m}"
            sshd_dir.mkdir()
            outcomes.append(sshd_run(sshd_dir, m, args_n))
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = [f"{'server':6} {'N':>6} {'up':>6} {'bring-up s':>10} {'hs/s':>6} "
             f"{'cpu ms/hs':>9} {'KiB RSS/t':>9} {'KiB PSS/t':>9} {'fds':>6} "
             f"{'storm s':>8} {'total s':>8} {'moved':>6} {'same':>6} {'online':>6}"]
    for o in outcomes:
        storm = o.server.startswith("hub") and o.storm_moved >= 0
        lines.append(
            f"{o.server:6} {o.n:6} {o.up:6} {o.bring_up_s:10.1f} {o.handshakes_per_s:6.0f} "
            f"{o.server_cpu_ms_per_handshake:9.2f} {o.rss_per_tunnel_kib:9.1f} "
            f"{o.pss_per_tunnel_kib:9.1f} {o.fds:6} "
            f"{o.storm_restore_s if storm else '-':>8} {o.storm_total_s if storm else '-':>8} "
            f"{o.storm_moved if storm else '-':>6} {o.storm_ports_same if storm else '-':>6} "
            f"{o.storm_online if storm else '-':>6}")
    lines += storm_ratios(outcomes)
    for o in outcomes:
        if o.notes:
            lines.append(f"  {o.server} N={o.n}: {o.notes.strip()}")
    return "\n".join(lines)


def storm_ratios(outcomes: list[Outcome]) -> list[str]:
    """For each N run with 1 and W workers: the 1-worker storm time over the W-worker one."""
    lines = []
    hubs = [o for o in outcomes if o.server.startswith("hub") and o.storm_restore_s > 0]
    for one in (o for o in hubs if o.workers == 1):
        for more in (o for o in hubs if o.n == one.n and o.workers > 1):
            lines.append(f"storm ratio N={one.n}: 1 worker {one.storm_restore_s:.1f} s / "
                         f"{more.workers} workers {more.storm_restore_s:.1f} s = "
                         f"{one.storm_restore_s / more.storm_restore_s:.2f}x (restart -> all "
                         f"back; CPU {one.storm_server_cpu_s} s / {more.storm_server_cpu_s} s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    tmp = tempfile.mkdtemp(prefix="callhomehub-tunnels-")
    try:
        source = use_hub_source(args.hub_source, Path(tmp))
        outcomes = run(args, Path(tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(outcomes))
    if args.json:
        write_doc(args.json, "tunnels", {
            "n": args.n, "workers": args.workers, "sshd_max": args.sshd_max,
            "concurrency": args.concurrency,
            "jitter_s": args.jitter, "backlog": args.backlog,
            "storm_concurrency": args.storm_concurrency, "backoff_max_s": args.backoff_max,
            "generator": args.generator,
            "algorithms": "asyncssh defaults" if args.asyncssh_defaults else "as OpenSSH 9.2",
            "machine": machine_info(), **source,
            "results": [asdict(o) for o in outcomes]})
    ok = all(o.up == o.n and (not o.server.startswith("hub") or not args.storm
                              or (o.storm_up == o.n and o.storm_moved == 0)) for o in outcomes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
