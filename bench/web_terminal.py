"""Keystroke echo latency of the web terminal against `ssh alice:node@hub`, in the same run.

    .venv/bin/python bench/web_terminal.py [--keys N] [--repeat R] [--quick] [--json FILE]

Setup: `twistd callhomehub --web tcp:0:interface=127.0.0.1` on loopback; a
throwaway `sshd` is the device, calling home with `ssh -N -R`; `callhomehub
approve bench`; `callhomehub user add alice --key … --password-stdin --allow '*'`,
and alice signs in to the console over HTTP (POST /signin) once. Two paths to
the same device, each a login shell with a pty on the device (the hub logs in
with its management key either way):

- ssh:  ssh -tt -p HUBPORT alice:bench@127.0.0.1      (stdin/stdout through pipes)
- web:  WebSocket /nodes/bench/terminal/socket         (a wsproto client, binary frames,
        with alice's session cookie)

On each, `exec cat >/dev/null` runs and one letter at a time is typed and its
echo (the device's tty echo) awaited: N keystrokes, p50/p99 of the round trip.
A return every 64 keys keeps the line short (not timed). Paths alternate, order
flipped every repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from attrs import define, field

# Run as a script: bench/ is on sys.path; the WebSocket client is the tests' one.
from common import SSH, Hub, machine_info, make_key, wait_for, wait_quiet
from gateway import Pipe, ssh_config
from peers import approved_device
from runner import add_common_options, install_sigterm, percentile, write_doc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from web_client import WebTerminalClient, sign_in  # noqa: E402

PATHS = ("ssh", "web")
WEB_RE = re.compile(r"callhomehub web listening on [\d.]+:(\d+)")
LETTERS = b"abcdefghijklmnopqrstuvwxyz"
PASSWORD = "bench-web-password"  # noqa: S105 - a throwaway hub's operator, for one run


class WebHub(Hub):
    """`twistd callhomehub` with the web console on a free loopback port; `cookie` is
    alice's signed-in session once `site` has signed her in."""

    web = 0
    cookie = ""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, ["--web", "tcp:0:interface=127.0.0.1"])

    def start(self) -> WebHub:
        super().start()

        def listening() -> str | None:
            found = WEB_RE.search(self.log_text())
            return found.group(1) if found else None

        self.web = int(wait_for(listening, 30, "the web console to listen"))
        return self


@define
class Result:
    path: str
    rtt_us: list[float] = field(factory=list)
    load_before: list[float] = field(factory=list)

    def summary(self) -> dict[str, float]:
        return {"keys": len(self.rtt_us),
                "p50_us": round(percentile(self.rtt_us, 50), 1),
                "p99_us": round(percentile(self.rtt_us, 99), 1),
                "max_us": round(max(self.rtt_us, default=0.0), 1)}


def keystrokes(write: Callable[[bytes], None], expect: Callable[[bytes], None], count: int
               ) -> list[float]:
    """`count` keys typed one at a time, each timed until its echo; microseconds."""
    write(b"exec cat >/dev/null\r")
    write(b"warm\r")
    expect(b"warm\r\n")
    rtts = []
    for i in range(count):
        key = LETTERS[i % len(LETTERS):][:1]
        start = time.perf_counter()
        write(key)
        expect(key)
        rtts.append((time.perf_counter() - start) * 1e6)
        if i % 64 == 63:
            write(b"\r")
            expect(b"\r\n")
    return rtts


def over_ssh(config: Path, hub: WebHub, count: int, log: Path) -> list[float]:
    pipe = Pipe([SSH, "-F", str(config), "-tt", "-p", str(hub.port), "alice:bench@127.0.0.1"],
                log)
    seen = bytearray()

    def expect(text: bytes) -> None:
        while text not in seen:
            chunk = pipe.read()
            if not chunk:
                raise RuntimeError(f"EOF from ssh before {text!r}")
            seen.extend(chunk)
        del seen[:seen.index(text) + len(text)]

    try:
        return keystrokes(lambda b: os.write(pipe.wfd, b) and None, expect, count)
    finally:
        pipe.close()


def over_web(hub: WebHub, count: int) -> list[float]:
    term = WebTerminalClient(hub.web, "/nodes/bench/terminal/socket?cols=80&rows=24",
                             timeout=60, cookie=hub.cookie)
    try:
        return keystrokes(term.type, lambda text: term.expect(text) and None, count)
    finally:
        term.close()


@contextlib.contextmanager
def site(workdir: Path) -> Iterator[tuple[WebHub, Path]]:
    with contextlib.ExitStack() as stack:
        hub = WebHub(workdir)
        stack.callback(hub.close)
        hub.start()
        approved_device(stack, workdir, hub)
        alice = make_key(workdir / "alice", "alice")
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--password-stdin",
                "--allow", "*", stdin=f"{PASSWORD}\n".encode())
        hub.cookie = sign_in(hub.web, "alice", PASSWORD)
        yield hub, ssh_config(workdir, alice)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1000,
                   help="keystrokes per path and repeat (default 1000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per path (default 3)")
    p.add_argument("--quick", action="store_true", help="200 keystrokes, 1 run")
    add_common_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.keys, args.repeat = 200, 1
        args.quiet_wait = min(args.quiet_wait, 2.0)
    return args


def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    log = workdir / "ssh.log"
    results = {path: Result(path) for path in PATHS}
    with site(workdir) as (hub, config):
        for repeat in range(args.repeat):
            for path in PATHS if repeat % 2 == 0 else PATHS[::-1]:
                result = results[path]
                if args.quiet_wait > 0:
                    result.load_before.append(
                        round(wait_quiet(args.quiet_below, args.quiet_wait), 2))
                rtts = (over_ssh(config, hub, args.keys, log) if path == "ssh"
                        else over_web(hub, args.keys))
                result.rtt_us += rtts
                print(f"  {path:4} p50 {percentile(rtts, 50):7.0f} us  "
                      f"p99 {percentile(rtts, 99):7.0f} us", file=sys.stderr, flush=True)
    return list(results.values())


def table(results: list[Result]) -> str:
    lines = [f"{'path':5} {'keys':>6} {'p50 us':>8} {'p99 us':>8} {'max us':>8}"]
    for r in results:
        s = r.summary()
        lines.append(f"{r.path:5} {s['keys']:6.0f} {s['p50_us']:8.0f} {s['p99_us']:8.0f} "
                     f"{s['max_us']:8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm()
    with tempfile.TemporaryDirectory(prefix="callhomehub-webterm-") as tmp:
        results = run(args, Path(tmp))
    print(table(results))
    if args.json:
        write_doc(args.json, "web_terminal", {
            "keys": args.keys, "repeat": args.repeat, "machine": machine_info(),
            "results": [{"path": r.path, "load_before": r.load_before, **r.summary()}
                        for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
