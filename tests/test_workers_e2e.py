"""`--workers 2` with real `ssh -R` devices: the kernel spreads them over both workers,
a killed worker comes back and its devices get their ports again, and stopping the hub
(or losing worker 0) leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import (
    SSH,
    DeviceSSHD,
    HubProcess,
    SSHClient,
    free_port,
    make_key,
    metrics_port,
    scrape,
    value,
    wait_for,
)
from tunnel_helpers import Device

pytestmark = pytest.mark.e2e

DEVICES = 20
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
FORWARD = re.compile(r"\[(w\d+ )?hub\.tunnel\.live#info\] node (dev-\d+): forward ssh on "
                     r"[\d.]+:(\d+)")


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie is dead, waiting for init to reap it


def worker_pids(hub: HubProcess) -> dict[int, list[int]]:
    pids: dict[int, list[int]] = {}
    for index, pid in STARTED.findall(hub.log_text()):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def placement(hub: HubProcess, since: int = 0) -> dict[str, tuple[str, int]]:
    """Which worker logged each device's forward last (w0: worker 0), and its port."""
    return {node: (worker.strip() or "w0", int(port))
            for worker, node, port in FORWARD.findall(hub.log_text()[since:])}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and not gone(int(entry)):
                found.append(int(entry))
    return found


@pytest.fixture
def hub(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HubProcess]:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    extra = getattr(request, "param", ())
    process = HubProcess(tmp_path / "hub", "--workers", "2", "--keepalive", "2", *extra)
    process.data.mkdir(parents=True)
    process.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    process.start()
    wait_for(lambda: "[w1 hub.app.sharedport#info] callhomehub SSH listening" in
             process.log_text(), 20, "worker 1 to listen")
    yield process
    process.stop()


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def echo_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload) and (chunk := s.recv(65536)):
            got += chunk
        return got


@pytest.mark.parametrize("hub", [("--port-keeper",)], indirect=True)
def test_each_worker_has_its_own_port_keeper(hub: HubProcess, tmp_path: Path,
                                             echo: int) -> None:
    devices = [Device(hub, tmp_path, f"dev-{i}") for i in range(12)]
    try:
        for device in devices:
            device.connect(f"0:127.0.0.1:{echo}", wait=False)
        wait_for(lambda: len(placement(hub)) == len(devices) and all(
            d.allocated() for d in devices), 60, "every device's forward")
        assert {w for w, _p in placement(hub).values()} == {"w0", "w1"}
        for device in devices:  # through worker 0's keeper and worker 1's
            payload = f"through {device.name}".encode() * 1000
            assert echo_through(device.allocated()[-1], payload) == payload
        assert hub.proc is not None
        [worker] = worker_pids(hub)[1]
        assert len(children(worker)) == 1  # its keeper
        assert len(children(hub.proc.pid)) == 2  # worker 1 and worker 0's keeper
    finally:
        for device in devices:
            device.close()


def banner_through(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(100)
    except OSError:
        return None


def test_an_operator_on_one_worker_reaches_the_devices_of_every_worker(
        hub: HubProcess, tmp_path: Path) -> None:
    """The workers reach each other's devices through the peer links between them:
    one operator connection (on one worker) reaches every device by `-L`, and
    approving a device held by worker 1 verifies its login from worker 0."""
    alice = make_key(tmp_path / "alice", "alice")
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    sshd = DeviceSSHD(tmp_path / "sshd", [mgmt, alice]).start()
    devices = [Device(hub, tmp_path, f"dev-{i}") for i in range(8)]
    operator = None
    try:
        for device in devices:
            device.connect(f"0:127.0.0.1:{sshd.port}", wait=False)
        wait_for(lambda: len(placement(hub)) == len(devices) and all(
            d.allocated() for d in devices), 60, "every device's forward")
        assert {w for w, _p in placement(hub).values()} == {"w0", "w1"}
        for device in devices:  # worker 0's control socket verifies each login
            approved = hub.cli("approve", device.name)
            assert b"pinned" in approved.stdout, approved.stderr
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "dev-*")
        local = {d.name: free_port() for d in devices}
        operator = SSHClient(tmp_path / "operator", hub.port).popen(
            "alice@127.0.0.1", key=alice, options=[
                "-N", "-o", "ExitOnForwardFailure=yes",
                *(a for name, port in local.items() for a in ("-L", f"{port}:{name}:22"))])
        for name, port in local.items():
            banner = wait_for(lambda p=port: banner_through(p), 15, f"-L to {name}")
            assert banner.startswith(b"SSH-2.0-OpenSSH"), (name, banner)
        assert "Traceback" not in hub.log_text()
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(10)
        for device in devices:
            device.close()
        sshd.stop()


@pytest.mark.parametrize("hub", [("--metrics", "tcp:0:interface=127.0.0.1")], indirect=True)
def test_devices_spread_over_workers_and_a_killed_worker_comes_back(
        hub: HubProcess, tmp_path: Path) -> None:
    """... and /metrics (worker 0's) counts the tunnels of both workers."""
    metrics = metrics_port(hub)

    def tunnels() -> float:
        return value(scrape(metrics), "callhomehub_tunnels_online")

    with ThreadPoolExecutor(4) as pool:
        devices = list(pool.map(lambda i: Device(hub, tmp_path, f"dev-{i}"), range(DEVICES)))
    try:
        for device in devices:
            device.connect("0:localhost:22", wait=False)
        wait_for(lambda: len(placement(hub)) == DEVICES and all(d.allocated() for d in devices),
                 60, "every device's forward")
        where = placement(hub)
        on = {w: sorted(n for n, (ww, _p) in where.items() if ww == w) for w in ("w0", "w1")}
        assert on["w0"] and on["w1"], on  # the kernel gave both workers some
        ports = {d.name: d.allocated()[-1] for d in devices}
        assert ports == {n: p for n, (_w, p) in where.items()}
        assert tunnels() == DEVICES
        timed = "callhomehub_registry_transaction_seconds_count"
        transactions = value(scrape(metrics), timed)

        [first] = worker_pids(hub)[1]
        mark = len(hub.log_text())
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: f"worker 1 (pid {first}) was killed by signal 9 (SIGKILL)"
                 in hub.log_text(), 10, "worker 0 to see worker 1 die")
        wait_for(lambda: len(worker_pids(hub)[1]) == 2, 10, "worker 1 to start again")
        assert not gone(worker_pids(hub)[1][1])
        # Its devices lost their connection; called back, each gets its old port
        # (from whichever worker the kernel hands it to).
        lost = [d for d in devices if d.name in on["w1"]]
        wait_for(lambda: all(d.proc is not None and d.proc.poll() is not None for d in lost),
                 10, "worker 1's devices to see their connection close")
        assert all(d.proc is not None and d.proc.poll() is None for d in devices
                   if d.name in on["w0"])  # worker 0's devices kept theirs
        assert tunnels() == len(on["w0"])
        assert value(scrape(metrics), timed) >= transactions  # worker 1's still count
        for device in lost:
            device.connect("0:localhost:22", wait=False)
        wait_for(lambda: set(placement(hub, mark)) >= set(on["w1"])
                 and all(d.allocated() for d in lost), 60, "worker 1's devices to come back")
        assert {d.name: d.allocated()[-1] for d in lost} == {n: ports[n] for n in on["w1"]}
        assert tunnels() == DEVICES
        assert "Traceback" not in hub.log_text()
    finally:
        for device in devices:
            device.close()
    pids = [p for ps in worker_pids(hub).values() for p in ps]
    hub.stop()
    assert hub.proc is not None and hub.proc.returncode == -signal.SIGTERM  # not SIGKILLed
    wait_for(lambda: all(gone(p) for p in pids), 10, "no worker left after SIGTERM")


def test_workers_stop_when_worker_0_disappears(hub: HubProcess) -> None:
    [worker] = worker_pids(hub)[1]
    assert hub.proc is not None
    hub.proc.kill()  # SIGKILL: worker 0 cannot stop its workers itself
    hub.proc.wait(10)
    wait_for(lambda: gone(worker), 10, "worker 1 to notice worker 0 is gone")


def test_ctrl_c_is_left_to_worker_0(hub: HubProcess) -> None:
    [worker] = worker_pids(hub)[1]
    assert hub.proc is not None
    os.kill(worker, signal.SIGINT)  # as a terminal sends it: to every process of the group
    os.kill(hub.proc.pid, signal.SIGINT)
    hub.proc.wait(20)
    text = hub.log_text()
    assert "[w1 twisted.internet.base#info] Received SIGINT" not in text
    assert f"worker 1 (pid {worker}) stopped" in text  # by worker 0, not a crash
    assert "#error]" not in text
    wait_for(lambda: gone(worker), 10, "worker 1 to be gone")

