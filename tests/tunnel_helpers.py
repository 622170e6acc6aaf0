"""Devices with real `ssh -R` tunnels, loopback servers, and process probes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from conftest import CALLHOME_PASSWORD
from helpers import HubProcess, SSHClient, make_key, wait_for

ALLOCATED = re.compile(rb"Allocated port (\d+) for remote forward to (\S+)")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, quiet: float = 1.0, timeout: float = 15.0) -> int:
    """The process's fd count once it has held still for `quiet` seconds: a hub
    that has just started listening still opens things of its own (the registry
    thread's connection) that a leak check must count as its baseline."""
    deadline = time.monotonic() + timeout
    count, since = open_fds(pid), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = open_fds(pid)
        if now != count:
            count, since = now, time.monotonic()
    return count


def fd_targets(pid: int) -> list[str]:
    """What the process's fds point at (for a failed leak check's message)."""
    targets = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            targets.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            continue
    return targets


def listening_ports(low: int, high: int) -> dict[int, str]:
    """Ports in [low, high] in LISTEN state on this machine, with their address."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp",):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":
                continue
            addr_hex, port_hex = local.split(":")
            port = int(port_hex, 16)
            if low <= port <= high:
                addr = socket.inet_ntoa(bytes.fromhex(addr_hex)[::-1])
                found[port] = addr
    return found


def nodes(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("nodes", "--json").stdout)


def node(hub: HubProcess, name: str) -> dict:
    return next(n for n in nodes(hub) if n["name"] == name)


class Device:
    """A registered device whose `ssh -N -R ...` tunnel can be started and killed."""

    def __init__(self, hub: HubProcess, workdir: Path, name: str) -> None:
        self.hub = hub
        self.name = name
        self.client = SSHClient(workdir / f"{name}-ssh", hub.port)
        self.key = make_key(workdir / f"{name}-key", name)
        result = self.client.run("cms@127.0.0.1", "register", name,
                                 password=CALLHOME_PASSWORD,
                                 stdin=Path(f"{self.key}.pub").read_bytes())
        assert result.returncode == 0, result.stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr = b""

    def connect(self, *forwards: str, wait: bool = True, extra: tuple[str, ...] = ()
                ) -> subprocess.Popen[bytes]:
        self.client.port = self.hub.port
        args = ["-N", "-o", "LogLevel=INFO", "-o", "ExitOnForwardFailure=yes",
                "-o", "ServerAliveInterval=15", *extra]
        for spec in forwards:
            args += ["-R", spec]
        self.proc = self.client.popen("cms@127.0.0.1", key=self.key, options=args)
        self._stderr = b""
        if wait and forwards:
            wait_for(lambda: len(self.allocated()) >= sum(":0:" in f or f.startswith("0:")
                                                           for f in forwards)
                     and self._forwards_up(len(forwards)), 20, f"{self.name}'s forwards")
        return self.proc

    def _forwards_up(self, count: int) -> bool:
        try:
            listed = node(self.hub, self.name)  # one CLI process per poll, not two
        except StopIteration:
            return False
        return listed["online"] and len(listed["forwards"]) >= count

    def stderr(self) -> bytes:
        """What ssh printed so far (read without blocking)."""
        if self.proc is not None and self.proc.stderr is not None:
            os.set_blocking(self.proc.stderr.fileno(), False)
            chunk = self.proc.stderr.read()
            if chunk:
                self._stderr += chunk
        return self._stderr

    def allocated(self) -> list[int]:
        return [int(p) for p, _ in ALLOCATED.findall(self.stderr())]

    def forwards(self) -> dict[str, int]:
        return node(self.hub, self.name)["forwards"]

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig != signal.SIGSTOP:
                self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


class PatternStream:
    """A deterministic byte stream of `total` bytes with a running hash."""

    BLOCK = hashlib.sha256(b"callhomehub").digest() * 32768  # 1 MiB

    def __init__(self, total: int) -> None:
        self.total = total

    def chunks(self):
        left = self.total
        while left > 0:
            n = min(left, len(self.BLOCK))
            yield self.BLOCK[:n]
            left -= n

    def digest(self) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()


class Sink:
    """Reads a socket to the end, optionally only after `release` is set."""

    def __init__(self, sock: socket.socket, gate: threading.Event | None = None) -> None:
        self.sock = sock
        self.gate = gate
        self.count = 0
        self.hash = hashlib.sha256()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.gate is not None:
            self.gate.wait(120)
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                break
            self.count += len(data)
            self.hash.update(data)
        self.sock.close()


class Source:
    """Writes a PatternStream into a socket, counting progress."""

    def __init__(self, sock: socket.socket, stream: PatternStream) -> None:
        self.sock = sock
        self.stream = stream
        self.sent = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for chunk in self.stream.chunks():
                view = memoryview(chunk)
                while view:
                    n = self.sock.send(view[:65536])
                    self.sent += n
                    view = view[n:]
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = e


def wait_stalled(progress, quiet: float = 1.5, timeout: float = 60.0) -> int:
    """Wait until `progress()` has not moved for `quiet` seconds; return it."""
    deadline = time.monotonic() + timeout
    last, since = progress(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return int(now)
    raise AssertionError("the sender never stalled")


class Listener:
    """A loopback TCP server handing each accepted socket to `handler`."""

    def __init__(self, handler) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            self.handler(conn)

    def close(self) -> None:
        self.sock.close()
