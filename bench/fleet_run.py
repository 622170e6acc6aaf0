"""`callhomehub run` across many tunnelled devices, against a plain loop of `ssh` over
their per-device (SDT) ports, in the same run.

    .venv/bin/python bench/fleet_run.py [--n 200] [--parallel 10] [--repeat 3]

Set-up: N device keys written into a fresh hub's registry, approved, each with the
host key of one real OpenSSH sshd pinned (every device's forward leads to that sshd,
which authorizes the hub's management key); one load-generator process
(`tunnel_load.py`, asyncssh) holds the N tunnels (`-R 0` to the sshd). Then, alternating,
`--repeat` times each:

- hub: `callhomehub run --parallel P -- true` (the hub logs in to every node through
  its tunnel with the management key and runs `true`);
- ssh loop: `ssh -p SDT_PORT root@127.0.0.1 true` for every node, P at a time (a
  thread pool), with the same management key;
- ssh loop 1: the same one node after another, as a shell `for` loop would.

Printed: wall seconds for all N, nodes per second, and the ratios to the hub.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import cli_command, port_range, wait_quiet
from fleet import Generator, make_keys, register_all
from peers import DeviceSSHD, HubProcess

SSH = shutil.which("ssh") or "ssh"


def approve_all(database: Path, names: list[str], host_key: bytes) -> None:
    from hub.store.registry import Registry

    registry = Registry(str(database), time.time)
    try:
        for name in names:
            registry.set_state(name, "approved", "bench")
            registry.set_device_access(name, "bench", host_key=host_key)
    finally:
        registry.close()


def hub_run(hub: HubProcess, parallel: int) -> float:
    start = time.perf_counter()
    result = subprocess.run([*cli_command(), "--data", str(hub.data), "run", "--parallel",
                             str(parallel), "--timeout", "120", "--json", "--", "true"],
                            capture_output=True, timeout=900)
    seconds = time.perf_counter() - start
    rows = json.loads(result.stdout or b"[]")
    bad = [r for r in rows if r["status"] != "ok"]
    if result.returncode != 0 or bad:
        raise RuntimeError(f"run failed on {len(bad)} node(s): {bad[:3]} "
                           f"{result.stderr.decode()[-500:]}")
    return seconds


def ssh_loop(ports: list[int], key: Path, known_hosts: Path, parallel: int) -> float:
    def one(port: int) -> None:
        result = subprocess.run(
            [SSH, "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=no",
             "-o", "LogLevel=ERROR", "-i", str(key), "-p", str(port), "root@127.0.0.1",
             "true"], capture_output=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"ssh -p {port}: {result.stderr.decode()[-300:]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, ports))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--parallel", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    hub = HubProcess(work, port_range=port_range(args.n))
    sshd: DeviceSSHD | None = None
    gen: Generator | None = None
    try:
        hub.start()  # makes the keys; stopped again to write the registry
        mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key"
        hub.stop()
        sshd = DeviceSSHD(work / "sshd", [Path(f"{mgmt}.pub").read_text()]).start()
        from hub.ssh.keys import parse_public_key

        host_key = parse_public_key(Path(f"{sshd.host_key}.pub").read_bytes()).blob
        keys = work / "keys.jsonl"
        publics = make_keys(keys, args.n)
        register_all(hub.data / "hub.sqlite3", publics)
        approve_all(hub.data / "hub.sqlite3", [name for name, _ in publics], host_key)
        hub.start(hub.port)
        gen = Generator(hub.port, keys, "cms", 50, 0.5, 60.0, 0, work / "generator.log",
                        service=f"127.0.0.1:{sshd.port}")
        if gen.wait(lambda e: e["event"] == "all-up", 300) is None:
            raise RuntimeError(f"the devices did not all come up: {gen.latest()}")
        nodes = json.loads(hub.cli("nodes", "--json"))
        ports = [int(n["forwards"]["ssh"]) for n in nodes if n["online"]]
        assert len(ports) == args.n, f"{len(ports)} of {args.n} online"
        known = work / "known_hosts"
        figures: dict[str, list[float]] = {"hub": [], "ssh": [], "ssh-1": []}
        for _ in range(args.repeat):
            for what in figures:
                wait_quiet(0.25, 20)
                seconds = (hub_run(hub, args.parallel) if what == "hub" else
                           ssh_loop(ports, mgmt, known, 1 if what == "ssh-1" else args.parallel))
                figures[what].append(seconds)
                print(f"  {what}: {args.n} nodes in {seconds:.2f} s", file=sys.stderr, flush=True)
        medians = {what: statistics.median(v) for what, v in figures.items()}
        print(f"{args.n} nodes, --parallel {args.parallel}, median of {args.repeat}:")
        for what, label in (("hub", f"callhomehub run --parallel {args.parallel}"),
                            ("ssh", f"ssh over SDT ports, {args.parallel} at a time"),
                            ("ssh-1", "ssh over SDT ports, one after another")):
            m = medians[what]
            print(f"  {label:45} {m:7.2f} s  {args.n / m:7.1f} nodes/s  "
                  f"hub is {m / medians['hub']:.2f}x faster" if what != "hub" else
                  f"  {label:45} {m:7.2f} s  {args.n / m:7.1f} nodes/s")
        if args.json:
            args.json.write_text(json.dumps({"n": args.n, "parallel": args.parallel,
                                             "seconds": figures}, indent=2))
    finally:
        if gen is not None:
            gen.close()
        if sshd is not None:
            sshd.close()
        hub.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
