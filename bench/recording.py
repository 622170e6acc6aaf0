"""What session recording costs the console gateway: bulk output and keystroke echo,
recording on against off, in the same run.

    .venv/bin/python bench/recording.py [--size MiB] [--keys N] [--repeat R]
                                        [--quick] [--json FILE]

Two hubs side by side, one with `[recordings] enabled = false`; one throwaway
`sshd` stands for the device and calls home to both (`ssh -N -R`), approved
on both, operator alice on both. Every measurement is `ssh -tt
alice:bench@127.0.0.1 CMD` (a pty session, so the recording hub records it):

- bulk: `cat FILE` of SIZE MiB of base64 text (terminal output), MB/s from the
  first byte to EOF as the client receives it, and the hub's CPU time per MiB;
- echo: `cat` on the device's raw pty; one keystroke written, its echo awaited,
  N times; p50/p99 in microseconds.

The hubs alternate (order flipped every repeat); ratios are on / off.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from attrs import define, field

# Run as a script: bench/ is on sys.path.
from common import SSH, Tunnel, machine_info, make_key, tree_cpu, wait_quiet
from gateway import Pipe, ssh_config
from peers import DeviceSSHD, HubProcess
from runner import add_common_options, install_sigterm, percentile, write_doc

MODES = ("off", "on")
MIB = 1 << 20


@define
class Result:
    mode: str
    rtt_us: list[float] = field(factory=list)
    bulk_mb_per_s: list[float] = field(factory=list)
    hub_cpu_ms_per_mib: list[float] = field(factory=list)
    hub_recording_bytes: int = 0

    def summary(self) -> dict[str, float]:
        return {"p50_us": round(percentile(self.rtt_us, 50), 1),
                "p99_us": round(percentile(self.rtt_us, 99), 1),
                "bulk_mb_per_s": statistics.median(self.bulk_mb_per_s)
                if self.bulk_mb_per_s else 0.0,
                "hub_cpu_ms_per_mib": statistics.median(self.hub_cpu_ms_per_mib)
                if self.hub_cpu_ms_per_mib else 0.0}


def command(config: Path, hub: HubProcess, remote: str) -> list[str]:
    return [SSH, "-F", str(config), "-tt", "-p", str(hub.port), "alice:bench@127.0.0.1", remote]


def bulk(config: Path, hub: HubProcess, path: Path, log: Path) -> tuple[float, float]:
    """(MB/s as the client receives it, hub CPU milliseconds per MiB)."""
    pipe = Pipe(command(config, hub, f"cat {path}"), log)
    try:
        got = len(pipe.read())
        start = time.perf_counter()
        cpu = sum(tree_cpu(hub.pids()))
        while chunk := pipe.read():
            got += len(chunk)
        seconds = time.perf_counter() - start
        cpu = sum(tree_cpu(hub.pids())) - cpu
    finally:
        pipe.close()
    if got < path.stat().st_size:
        raise RuntimeError(f"bulk: {got} bytes of {path.stat().st_size}")
    return got / seconds / 1e6, cpu * 1000 / (got / MIB)


def echo(config: Path, hub: HubProcess, count: int, log: Path) -> list[float]:
    # A raw pty without echo: each keystroke comes back once, from `cat`, as an
    # editor's screen update would.
    pipe = Pipe(command(config, hub, "stty raw -echo; echo READY; cat"), log)
    try:
        pipe.expect(b"READY\n")
        rtts = []
        for i in range(count):
            key = b"abcdefghijklmnopqrstuvwxyz"[i % 26:i % 26 + 1]
            start = time.perf_counter()
            os.write(pipe.wfd, key)
            pipe.expect(key)
            rtts.append((time.perf_counter() - start) * 1e6)
        return rtts
    finally:
        pipe.close()


@contextlib.contextmanager
def hubs(workdir: Path) -> Iterator[tuple[Path, dict[str, HubProcess]]]:
    with contextlib.ExitStack() as stack:
        device_key = make_key(workdir / "device_key", "bench")
        alice = make_key(workdir / "alice", "alice")
        started: dict[str, HubProcess] = {}
        for mode in MODES:
            (workdir / mode).mkdir()
            hub = HubProcess(workdir / mode, config="" if mode == "on"
                             else "[recordings]\nenabled = false\n")
            stack.callback(hub.close)
            hub.start()
            hub.register(device_key, workdir / mode)
            started[mode] = hub
        authorized = [(h.data / "keys" / "hub_mgmt_ed25519_key.pub").read_text()
                      for h in started.values()]
        device = DeviceSSHD(workdir / "device", [*authorized, Path(f"{alice}.pub").read_text()])
        stack.callback(device.close)
        device.start()
        for mode, hub in started.items():
            tunnel = Tunnel(workdir / mode, hub, device_key, device.port,
                            "chacha20-poly1305@openssh.com", None)
            stack.callback(tunnel.close)
            tunnel.start()
            if "pinned" not in hub.cli("approve", "bench"):
                raise RuntimeError("approve did not pin the device host key")
            hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "*")
        yield ssh_config(workdir, alice), started


def text_file(path: Path, size: int) -> Path:
    """SIZE bytes of base64 lines: what a terminal shows, not what it never would."""
    rng = random.Random(1)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = base64.encodebytes(rng.randbytes(3 * 1024 * 1024))[:left]
            f.write(chunk)
            left -= len(chunk)
    return path


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    data = text_file(workdir / "bulk.txt", args.size * MIB)
    log = workdir / "ssh.log"
    results = {mode: Result(mode) for mode in MODES}
    with hubs(workdir) as (config, started):
        for repeat in range(args.repeat):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                if args.quiet_wait > 0:
                    wait_quiet(args.quiet_below, args.quiet_wait)
                r = results[mode]
                mb_s, cpu = bulk(config, started[mode], data, log)
                r.bulk_mb_per_s.append(round(mb_s, 1))
                r.hub_cpu_ms_per_mib.append(round(cpu, 2))
                r.rtt_us += echo(config, started[mode], args.keys, log)
                s = r.summary()
                print(f"  recording {mode:3} bulk {mb_s:6.1f} MB/s hub {cpu:5.1f} ms/MiB  "
                      f"echo p50 {s['p50_us']:6.0f} us p99 {s['p99_us']:6.0f} us",
                      file=sys.stderr, flush=True)
        for mode, hub in started.items():
            folder = hub.data / "recordings"
            results[mode].hub_recording_bytes = sum(
                p.stat().st_size for p in folder.iterdir()) if folder.exists() else 0
    return list(results.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="MiB of bulk output (default 64)")
    p.add_argument("--keys", type=int, default=1000, help="keystrokes per run (default 1000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per mode (default 3)")
    p.add_argument("--quick", action="store_true", help="16 MiB, 200 keystrokes, 1 run")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.keys, args.repeat = 16, 200, 1
        args.quiet_wait = min(args.quiet_wait, 2.0)
    install_sigterm()
    with tempfile.TemporaryDirectory(prefix="callhomehub-recording-") as tmp:
        results = run(args, Path(tmp))
    by = {r.mode: r.summary() for r in results}
    ratios = {
        "bulk_on_over_off": round(by["on"]["bulk_mb_per_s"] / by["off"]["bulk_mb_per_s"], 3),
        "hub_cpu_per_mib_on_over_off": round(
            by["on"]["hub_cpu_ms_per_mib"] / by["off"]["hub_cpu_ms_per_mib"], 3),
        "echo_p50_on_over_off": round(by["on"]["p50_us"] / by["off"]["p50_us"], 3),
        "echo_p99_on_over_off": round(by["on"]["p99_us"] / by["off"]["p99_us"], 3)}
    print(f"{'recording':10} {'bulk MB/s':>10} {'hub ms/MiB':>11} {'echo p50 us':>12} "
          f"{'echo p99 us':>12}")
    for r in results:
        s = by[r.mode]
        print(f"{r.mode:10} {s['bulk_mb_per_s']:10.1f} {s['hub_cpu_ms_per_mib']:11.1f} "
              f"{s['p50_us']:12.0f} {s['p99_us']:12.0f}")
    print("on/off: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    if args.json:
        write_doc(args.json, "recording", {
            "size_mib": args.size, "keys": args.keys, "repeat": args.repeat,
            "machine": machine_info(),
            "results": [{"mode": r.mode, "bulk_mb_per_s": r.bulk_mb_per_s,
                         "hub_cpu_ms_per_mib": r.hub_cpu_ms_per_mib,
                         "hub_recording_bytes": r.hub_recording_bytes, **by[r.mode]}
                        for r in results],
            "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
