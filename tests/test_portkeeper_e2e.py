"""`--port-keeper`: forwards held by the helper process, with the real ssh and sshd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import SSH, DeviceSSHD, HubProcess, make_key, wait_for
from tunnel_helpers import Device, node

pytestmark = pytest.mark.e2e


def listener_inodes(port: int) -> set[str]:
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            inodes.add(fields[9])
    return inodes


def holders(inodes: set[str]) -> set[int]:
    """Pids with one of these sockets open."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    found.add(int(pid))
        except OSError:
            continue
    return found


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def ssh_to(port: int, key: Path, command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-i", str(key), "root@127.0.0.1", command],
        capture_output=True, timeout=30)


@pytest.fixture
def keeper_hub(tmp_path: Path) -> Iterator[HubProcess]:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    process = HubProcess(tmp_path / "hub", "--keepalive", "2", "--port-keeper")
    process.data.mkdir(parents=True)
    process.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    process.start()
    yield process
    process.stop()


def test_forwards_through_the_port_keeper(keeper_hub: HubProcess, tmp_path: Path) -> None:
    hub = keeper_hub
    operator_key = make_key(tmp_path / "operator", "operator")
    sshd = DeviceSSHD(tmp_path / "sshd", [operator_key]).start()
    device = Device(hub, tmp_path, "site-a")
    try:
        device.connect(f"0:127.0.0.1:{sshd.port}")
        port = device.forwards()["ssh"]
        result = ssh_to(port, operator_key, "echo through the keeper")
        assert (result.returncode, result.stdout) == (0, b"through the keeper\n")
        # The listener is the keeper's, not the hub's.
        assert hub.proc is not None
        [keeper] = children(hub.proc.pid)
        assert holders(listener_inodes(port)) == {keeper}

        # A keeper that dies takes its ports along: the hub says so, drops the
        # tunnel and starts another; the device calls back and gets its port again.
        os.kill(keeper, signal.SIGKILL)
        wait_for(lambda: "its ports are gone" in hub.log_text(), 10, "the hub to notice")
        wait_for(lambda: not node(hub, "site-a")["online"], 10, "the tunnel to drop")
        wait_for(lambda: children(hub.proc.pid) - {keeper}, 10, "a new keeper")
        device.close()
        device.proc = None
        device.connect(f"0:127.0.0.1:{sshd.port}")
        assert device.forwards()["ssh"] == port
        result = ssh_to(port, operator_key, "echo again")
        assert (result.returncode, result.stdout) == (0, b"again\n")
    finally:
        device.close()
        sshd.stop()
    # The keeper goes with the hub.
    [keeper] = children(hub.proc.pid)
    hub.stop()
    wait_for(lambda: not os.path.exists(f"/proc/{keeper}"), 10, "the keeper to exit")
    with socket.socket() as s:
        # SO_REUSEADDR: a connection the hub closed first may sit in TIME_WAIT on
        # the port; a listener still holding it would fail the bind all the same.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
