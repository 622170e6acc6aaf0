"""Many devices and many forwarded connections against a real hub process.

Real `ssh -N -R` clients play the devices; a loopback echo server stands for
the service on the device side. After the load the hub must hold no more file
descriptors and no more listeners than before, and its memory must not grow
with the number of connections it has carried.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from helpers import SSH, HubProcess, sdt_port_range, wait_for
from tunnel_helpers import (
    ALLOCATED,
    fd_targets,
    listening_ports,
    open_fds,
    rss_kib,
    settled_fds,
)

from hub.ssh.keys import parse_public_key
from hub.store.registry import Registry

pytestmark = pytest.mark.e2e

LOW, HIGH = sdt_port_range()  # the `hub` fixture's range
FD_SLACK = 3


# -- probes -----------------------------------------------------------------

def hub_listeners(pid: int) -> set[int]:
    """TCP ports the process `pid` itself listens on (by socket inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def fds_back_to(pid: int, baseline: int, opened: list[str]) -> None:
    """Wait until the hub holds no more fds than at start (give or take FD_SLACK)."""
    try:
        wait_for(lambda: open_fds(pid) <= baseline + FD_SLACK, 20,
                 f"the hub's fds back to {baseline}")
    except AssertionError as e:
        raise AssertionError(f"{e}; at start {opened}, now {fd_targets(pid)}") from None


def registry_of(hub: HubProcess) -> Registry:
    return Registry(str(hub.data / "hub.sqlite3"), now=time.time)


# -- the device side ------------------------------------------------------------

class EchoServer:
    """A loopback echo server in one thread; closes a connection on its EOF."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.2):
                sock = key.fileobj
                if sock is self.sock:
                    self._accept()
                else:
                    self._serve(sock)  # type: ignore[arg-type]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self._sel.register(conn, selectors.EVENT_READ)
            self.accepted += 1
            self.open += 1

    def _serve(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
            if data:
                conn.sendall(data)  # a few bytes: never blocks
                return
        except OSError:
            pass
        self._sel.unregister(conn)
        conn.close()
        self.open -= 1

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()


class Tunnel:
    """One device: a fresh key, registered, and its `ssh -N -R` process."""

    def __init__(self, hub: HubProcess, workdir: Path, name: str) -> None:
        self.hub = hub
        self.name = name
        self.key = workdir / f"{name}.key"
        private = ed25519.Ed25519PrivateKey.generate()
        self.key.write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))
        self.key.chmod(0o600)
        self.public = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" " + \
            name.encode()
        self.known_hosts = workdir / f"{name}.known_hosts"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *forwards: str) -> None:
        args = [SSH or "ssh", "-F", "/dev/null", "-p", str(self.hub.port),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no",
                "-o", "LogLevel=INFO", "-o", "ExitOnForwardFailure=yes",
                "-o", "ServerAliveInterval=15", "-i", str(self.key), "-N"]
        for spec in forwards:
            args += ["-R", spec]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*args, "cms@127.0.0.1"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)

    def allocated(self) -> list[int]:
        return [int(p) for p, _ in ALLOCATED.findall(self.log.read_bytes())]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(10)


def register_all(hub: HubProcess, tunnels: list[Tunnel]) -> None:
    # Registration over SSH (`ssh cms@hub register`, a bcrypt password check
    # each) is covered by the registrar tests; at this scale the keys go
    # straight into the registry file the hub reads, as the CLI would.
    registry = registry_of(hub)
    try:
        for t in tunnels:
            key = parse_public_key(t.public)
            registry.register(t.name, key.blob, key.fingerprint, "test:scale")
    finally:
        registry.close()


def online_forwards(hub: HubProcess, names: set[str]) -> dict[str, int]:
    """name -> ssh port of the given nodes that are online with their forward."""
    registry = registry_of(hub)
    try:
        return {n.name: n.forwards["ssh"] for n in registry.nodes()
                if n.name in names and n.online and "ssh" in n.forwards}
    finally:
        registry.close()


def any_online(hub: HubProcess) -> bool:
    registry = registry_of(hub)
    try:
        return any(n.online for n in registry.nodes())
    finally:
        registry.close()


def assert_clean_log(hub: HubProcess) -> None:
    text = hub.log_text()
    for bad in ("Traceback", "Unhandled"):
        assert bad not in text, text[text.index(bad) - 2000:text.index(bad) + 3000]


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        return s.recv(len(payload))


def start_tunnels(hub: HubProcess, tmp_path: Path, count: int, echo: EchoServer,
                  timeout: float) -> tuple[list[Tunnel], dict[str, int]]:
    tunnels = [Tunnel(hub, tmp_path, f"dev-{i:03d}") for i in range(count)]
    register_all(hub, tunnels)
    for t in tunnels:
        t.start(f"0:127.0.0.1:{echo.port}")
    names = {t.name for t in tunnels}
    try:
        wait_for(lambda: len(online_forwards(hub, names)) == count
                 and all(t.allocated() for t in tunnels), timeout, f"{count} tunnels up")
    except AssertionError as e:
        up = online_forwards(hub, names)
        down = [t for t in tunnels if t.name not in up or not t.allocated()]
        detail = "\n".join(f"{t.name}: exit {t.proc.poll() if t.proc else None}: "
                           f"{t.log.read_text(errors='replace')[-300:]!r}" for t in down[:5])
        raise AssertionError(f"{e}: {len(up)} online, {len(down)} not up\n{detail}\n"
                             f"hub log tail:\n{hub.log_text()[-3000:]}") from None
    return tunnels, online_forwards(hub, names)


def stop_tunnels(tunnels: list[Tunnel]) -> None:
    for t in tunnels:
        t.kill()
    for t in tunnels:
        t.reap()


# -- (a) many devices -----------------------------------------------------------

DEVICES = 100


def test_hundred_devices_then_all_killed(hub: HubProcess, tmp_path: Path) -> None:
    pid = hub.proc.pid  # type: ignore[union-attr]
    baseline = settled_fds(pid)
    opened = fd_targets(pid)
    echo = EchoServer()
    tunnels: list[Tunnel] = []
    try:
        started = time.monotonic()
        tunnels, ports = start_tunnels(hub, tmp_path, DEVICES, echo, 60)
        up = time.monotonic() - started
        # Every device has its own port, the one OpenSSH was told, bound by the hub.
        assert len(set(ports.values())) == DEVICES
        assert all(LOW <= p <= HIGH for p in ports.values())
        for t in tunnels:
            assert t.allocated() == [ports[t.name]], t.log.read_text()
        assert hub_listeners(pid) == {hub.port, *ports.values()}
        loaded = open_fds(pid)
        # Each tunnel costs the hub its SSH socket and its listener.
        assert loaded - baseline >= 2 * DEVICES

        # Every forward reaches its device.
        with ThreadPoolExecutor(16) as pool:
            echoes = list(pool.map(lambda p: echo_once(p, b"%d" % (p % 10)), ports.values()))
        assert echoes == [b"%d" % (p % 10) for p in ports.values()]
        wait_for(lambda: echo.open == 0, 10, "the device-side connections to close")

        stop_tunnels(tunnels)
        wait_for(lambda: hub_listeners(pid) == {hub.port}, 20, "every listener released")
        wait_for(lambda: not any_online(hub), 10, "every node offline")
        fds_back_to(pid, baseline, opened)
        left = set(listening_ports(LOW, HIGH)) & set(ports.values())
        assert not left, f"ports still listening: {sorted(left)}"
        assert_clean_log(hub)
        print(f"\n[scale] {DEVICES} devices up in {up:.1f}s; hub fds: baseline {baseline}, "
              f"with tunnels {loaded}, after kill {open_fds(pid)}")
    finally:
        stop_tunnels(tunnels)
        echo.close()


# -- (b) many short connections ---------------------------------------------------

TUNNELS = 4
CONNECTIONS = 4000
WORKERS = 24
MODES = ("close", "rst", "half", "rst-early")


def rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def short_connection(port: int, i: int) -> str:
    """One forwarded connection: a byte there and back, then the mode's close."""
    mode = MODES[i % len(MODES)]
    payload = bytes([i % 251])
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        s.sendall(payload)
        if mode == "rst-early":  # gone before the answer, maybe before the channel
            rst_close(s)
            return mode
        got = s.recv(1)
        if got != payload:
            return f"{mode}: echoed {got!r}"
        if mode == "close":
            s.close()
        elif mode == "rst":
            rst_close(s)
        else:  # half: our EOF must reach the device, and its EOF come back
            s.shutdown(socket.SHUT_WR)
            rest = s.recv(1)
            s.close()
            if rest != b"":
                return f"half: {rest!r} after EOF"
        return mode
    except OSError as e:
        s.close()
        return f"{mode}: {e!r}"


def run_connections(ports: list[int], count: int, offset: int = 0) -> Counter[str]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return Counter(pool.map(lambda i: short_connection(ports[i % len(ports)], i),
                                range(offset, offset + count)))


def test_thousands_of_short_connections(hub: HubProcess, tmp_path: Path) -> None:
    pid = hub.proc.pid  # type: ignore[union-attr]
    baseline = settled_fds(pid)
    opened = fd_targets(pid)
    echo = EchoServer()
    tunnels: list[Tunnel] = []
    try:
        tunnels, by_name = start_tunnels(hub, tmp_path, TUNNELS, echo, 30)
        ports = sorted(by_name.values())
        with_tunnels = open_fds(pid)
        # Warm up (imports, caches, the allocator's pools) before measuring.
        warm = run_connections(ports, 200)
        assert set(warm) == set(MODES), warm
        wait_for(lambda: open_fds(pid) <= with_tunnels + FD_SLACK, 15, "warm-up fds released")
        rss_before = rss_kib(pid)

        # Two equal rounds: a leak grows with each, noise does not.
        half = CONNECTIONS // 2
        started = time.monotonic()
        outcomes = run_connections(ports, half, offset=200)
        wait_for(lambda: open_fds(pid) <= with_tunnels + FD_SLACK, 20, "round 1 fds released")
        rss_middle = rss_kib(pid)
        outcomes += run_connections(ports, half, offset=200 + half)
        took = time.monotonic() - started
        assert outcomes == Counter({m: CONNECTIONS // len(MODES) for m in MODES}), outcomes

        # Every connection, however it ended, gave its descriptors back.
        wait_for(lambda: open_fds(pid) <= with_tunnels + FD_SLACK, 20,
                 f"the hub's fds back to {with_tunnels} (now {open_fds(pid)})")
        wait_for(lambda: echo.open == 0, 20, "the device-side connections to close")
        rss_after = rss_kib(pid)
        grown = rss_after - rss_before

        stop_tunnels(tunnels)
        wait_for(lambda: hub_listeners(pid) == {hub.port}, 20, "every listener released")
        fds_back_to(pid, baseline, opened)
        assert_clean_log(hub)
        print(f"\n[scale] {CONNECTIONS} connections through {TUNNELS} tunnels in {took:.1f}s "
              f"({CONNECTIONS / took:.0f}/s); echo server accepted {echo.accepted}; "
              f"hub fds: baseline {baseline}, with tunnels {with_tunnels}, "
              f"after {open_fds(pid)}; RSS {rss_before} -> {rss_middle} -> {rss_after} KiB "
              f"(+{rss_middle - rss_before}, +{rss_after - rss_middle} KiB per round of "
              f"{half})")
        assert grown < 16 * 1024, f"hub RSS grew by {grown} KiB over {CONNECTIONS} connections"
        assert rss_after - rss_middle < 4 * 1024, "hub RSS keeps growing with connections"
    finally:
        stop_tunnels(tunnels)
        echo.close()
