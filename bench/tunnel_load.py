"""Load generator for bench/tunnels.py: many call-home devices in one asyncssh process.

    .venv/bin/python bench/tunnel_load.py --port P --keys FILE [--user cms]
                                          [--concurrency C] [--jitter S]

Every key in FILE (JSON lines: {"name", "key"} with an OpenSSH private key) is
one device: it connects as USER, asks for one reverse forward with port 0
(`tcpip-forward` '' 0, as `ssh -R 0:...` does) and holds it idle. A device
whose connection drops reconnects after a random delay of up to --jitter
seconds (with at most --storm-concurrency handshakes in flight, if set)
and retries until it has its forward back, backing off as
device/callhome.sh does (1 s doubling up to --backoff-max, "equal jitter"); the first port it got is
remembered and every later one compared with it. The first bring-up runs at
most --concurrency handshakes at once.

Reports on stdout, one JSON object a line, every --interval seconds and at each
milestone; `time.monotonic()` stamps (one clock for all processes on Linux).
Stops on stdin EOF, SIGTERM or SIGINT, closing every connection.

The SSH client is a `Client` (here asyncssh's); `tunnel_load_c.py` runs the
same fleet with libssh2's compiled handshake instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import asyncssh
from attrs import define, field

# The device's service behind the forward (--service); the tunnel benchmark never
# connects to it, the fleet-command one points it at a real sshd.
DEVICE_SERVICE = ("127.0.0.1", 9)
# What a device's OpenSSH 9.2 client negotiates with the hub: asyncssh on its own
# would pick the hub's RSA host key (a ~1 ms signature per handshake) and ML-KEM.
LIKE_OPENSSH = {"kex_algs": ["curve25519-sha256", "curve25519-sha256@libssh.org"],
                "server_host_key_algs": ["ssh-ed25519", "ecdsa-sha2-nistp256"],
                "encryption_algs": ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com"]}


class Connection(Protocol):
    """One device's held SSH connection, as `hold` needs it."""

    async def wait_closed(self) -> None: ...

    def abort(self) -> None: ...


class Client(Protocol):
    """The SSH library a generator drives: its device keys, handshakes and errors."""

    errors: tuple[type[BaseException], ...]   # a failed attempt, retried after a back-off

    def load_key(self, text: str) -> Any: ...

    async def connect(self, args: argparse.Namespace, key: Any) -> tuple[Connection, int]:
        """Log in with `key`, ask for the port-0 forward; the connection and its port."""
        ...


@define(eq=False)
class Device:
    name: str
    key: Any                       # what the Client's load_key made
    first_port: int = 0
    port: int = 0
    up: bool = False
    connects: int = 0
    failures: int = 0
    backoff: float = 1.0
    last_error: str = ""


@define(eq=False)
class Fleet:
    """All devices and the counters the reports are made of."""

    devices: list[Device]
    args: argparse.Namespace
    client: Client
    gate: asyncio.Semaphore
    storm_gate: asyncio.Semaphore | None
    started: float = field(factory=time.monotonic)
    up: int = 0
    moved: int = 0
    handshakes: int = 0
    failures: int = 0
    all_up_at: float | None = None
    ever_all_up: bool = False

    def report(self, event: str, **extra: Any) -> None:
        errors: dict[str, int] = {}
        for d in self.devices:
            if d.last_error and not d.up:
                errors[d.last_error] = errors.get(d.last_error, 0) + 1
        line = {"event": event, "t": time.monotonic(), "up": self.up, "n": len(self.devices),
                "handshakes": self.handshakes, "failures": self.failures, "moved": self.moved,
                "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:3]), **extra}
        print(json.dumps(line), flush=True)


async def hold(fleet: Fleet, device: Device) -> None:
    """Connect, forward, wait for the connection to drop; again, forever."""
    args = fleet.args
    while True:
        try:
            conn = await connect(fleet, device)
        except fleet.client.errors as e:
            device.failures += 1
            fleet.failures += 1
            device.last_error = type(e).__name__ + (f": {e}"[:60] if str(e) else "")
            await asyncio.sleep(random.uniform(device.backoff / 2, device.backoff))
            device.backoff = min(device.backoff * 2, args.backoff_max)
            continue
        device.backoff = 1.0
        mark_up(fleet, device)
        try:
            await conn.wait_closed()
        finally:
            conn.abort()
            device.up = False
            fleet.up -= 1
        device.last_error = "connection lost"
        await asyncio.sleep(random.uniform(0, args.jitter))


async def connect(fleet: Fleet, device: Device) -> Connection:
    """One handshake and forward; the first bring-up is limited to --concurrency at once."""
    if not (fleet.ever_all_up or device.connects):
        async with fleet.gate:
            return await handshake(fleet, device)
    if fleet.storm_gate is None:
        return await handshake(fleet, device)
    async with fleet.storm_gate:
        return await handshake(fleet, device)


async def handshake(fleet: Fleet, device: Device) -> Connection:
    conn, device.port = await fleet.client.connect(fleet.args, device.key)
    device.connects += 1
    return conn


class AsyncsshClient:
    """asyncssh: all of the SSH protocol in Python (its ciphers in `cryptography`)."""

    errors = (TimeoutError, OSError, asyncssh.Error)

    def load_key(self, text: str) -> asyncssh.SSHKey:
        return asyncssh.import_private_key(text)

    async def connect(self, args: argparse.Namespace, key: asyncssh.SSHKey
                      ) -> tuple[Connection, int]:
        conn = await asyncssh.connect(
            args.host, args.port, username=args.user, client_keys=[key], known_hosts=None,
            agent_path=None, config=[], preferred_auth="publickey",
            connect_timeout=args.timeout, login_timeout=args.timeout, keepalive_interval=0,
            gss_host=None, **(LIKE_OPENSSH if args.like_openssh else {}))
        try:
            listener = await asyncio.wait_for(
                conn.forward_remote_port("", 0, *args.service), args.timeout)
        except BaseException:
            conn.abort()
            raise
        return conn, listener.get_port()


def mark_up(fleet: Fleet, device: Device) -> None:
    fleet.handshakes += 1
    if not device.first_port:
        device.first_port = device.port
    elif device.port != device.first_port:
        fleet.moved += 1
    device.up = True
    device.last_error = ""
    fleet.up += 1
    if fleet.up == len(fleet.devices):
        fleet.ever_all_up = True
        fleet.report("all-up", ports={d.name: d.port for d in fleet.devices}
                     if fleet.args.ports else {})


async def reporter(fleet: Fleet) -> None:
    while True:
        await asyncio.sleep(fleet.args.interval)
        fleet.report("progress")


async def until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)


def load_keys(path: Path, client: Client) -> list[Device]:
    devices = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        devices.append(Device(entry["name"], client.load_key(entry["key"])))
    return devices


async def main_async(args: argparse.Namespace, client: Client) -> None:
    devices = load_keys(args.keys, client)
    storm_gate = asyncio.Semaphore(args.storm_concurrency) if args.storm_concurrency else None
    fleet = Fleet(devices, args, client, asyncio.Semaphore(args.concurrency), storm_gate)
    fleet.report("start")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(hold(fleet, d)) for d in devices]
    tasks.append(asyncio.create_task(reporter(fleet)))
    stdin = asyncio.create_task(until_stdin_closes())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([stdin, waiter], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    fleet.report("stopped")


def service(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="cms")
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--jitter", type=float, default=2.0)
    p.add_argument("--storm-concurrency", type=int, default=0,
                   help="handshakes in flight at once when reconnecting (0: unlimited)")
    p.add_argument("--backoff-max", type=float, default=60.0,
                   help="a failed attempt is retried after 0.5..1 x a back-off that starts "
                        "at 1 s and doubles up to this (device/callhome.sh's policy)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--asyncssh-defaults", dest="like_openssh", action="store_false",
                   help="let asyncssh choose kex, host key and cipher (default: as OpenSSH 9.2)")
    p.add_argument("--ports", action="store_true", help="list every port in all-up events")
    p.add_argument("--service", type=service, default=DEVICE_SERVICE, metavar="HOST:PORT",
                   help="where each device's forward leads (default: 127.0.0.1:9, unused)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, client: Client | None = None) -> int:
    args = parse_args(argv)
    asyncio.run(main_async(args, client or AsyncsshClient()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
