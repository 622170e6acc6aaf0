"""Two hub processes on one PostgreSQL registry, with the real ssh client and a real
sshd device.

Each hub has its own data directory holding a copy of the same keys/ (devices
see one host key; each hub makes its own peer key) and `--registry` naming one
database on the test PostgreSQL server. A device calls hub A; an operator on
hub B reaches it through the peer connection. (Workers of one machine sharing
the SQLite file: tests/test_workers_e2e.py.)
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import define
from conftest import CALLHOME_PASSWORD
from helpers import SSH, DeviceSSHD, HubProcess, SSHClient, make_key, wait_for
from postgres import Cluster
from tunnel_helpers import Device, node

from hub.ssh.keys import PEER_KEY_FILE

pytestmark = pytest.mark.e2e

PEER_RE = re.compile(r"callhomehub peer listening on [\d.]+:(\d+)")


def start_hub(data: Path, hub_id: str, public: str, registry: str) -> HubProcess:
    (data / "callhomehub.toml").write_text(f'[cluster]\nid = "{hub_id}"\n')
    # Each hub its own public interface: both can bind a node's public port.
    hub = HubProcess(data, "--keepalive", "2", "--peer", "tcp:0:interface=127.0.0.1",
                     "--public-interface", public, "--registry", registry).start()
    wait_for(lambda: PEER_RE.search(hub.log_text()), 20, f"hub {hub_id}'s peer listener")
    return hub


@define
class Fleet:
    a: HubProcess
    b: HubProcess
    sshd: DeviceSSHD
    device: Device
    alice: Path
    tmp: Path

    def operator(self, hub: HubProcess) -> SSHClient:
        return SSHClient(self.tmp / f"operator-{hub.port}", hub.port)


@pytest.fixture
def fleet(tmp_path: Path, postgres: Cluster, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Fleet]:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    registry = postgres.database()
    monkeypatch.setenv("CALLHOMEHUB_REGISTRY", registry)  # for the CLI (hub.cli)
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    data_a.mkdir()
    HubProcess(data_a).cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    a = start_hub(data_a, "hub-a", "127.0.0.3", registry)
    # Hub B: the same host and management keys (not A's peer key), the same registry.
    shutil.copytree(data_a / "keys", data_b / "keys",
                    ignore=shutil.ignore_patterns(f"{PEER_KEY_FILE}*"))
    b = start_hub(data_b, "hub-b", "127.0.0.2", registry)
    alice = make_key(tmp_path / "alice", "alice")
    sshd = DeviceSSHD(tmp_path / "sshd", [data_a / "keys" / "hub_mgmt_ed25519_key.pub",
                                          alice]).start()
    device = Device(a, tmp_path, "site-a")
    device.connect(f"0:127.0.0.1:{sshd.port}")
    a.cli("approve", "site-a")
    b.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "site-*")
    yield Fleet(a, b, sshd, device, alice, tmp_path)
    device.close()
    sshd.stop()
    b.stop()
    a.stop()


def test_an_operator_on_hub_b_reaches_a_device_on_hub_a(fleet: Fleet, tmp_path: Path) -> None:
    assert node(fleet.b, "site-a")["online"]
    operator = fleet.operator(fleet.b)
    result = operator.run("alice:site-a@127.0.0.1", "echo via-b; exit 3", key=fleet.alice)
    assert (result.returncode, result.stdout) == (3, b"via-b\n"), result.stderr
    assert "relaying to site-a" in fleet.a.log_text()
    # The jump host: -J to the device's own sshd, and -W.
    device_known = tmp_path / "device_known_hosts"
    device_known.write_text(f"site-a {Path(f'{fleet.sshd.host_key}.pub').read_text()}")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host 127.0.0.1\n  UserKnownHostsFile {operator.known_hosts}\n"
        "  StrictHostKeyChecking accept-new\n"
        f"Host site-a\n  UserKnownHostsFile {device_known}\n  StrictHostKeyChecking yes\n"
        f"Host *\n  BatchMode yes\n  IdentitiesOnly yes\n  IdentityFile {fleet.alice}\n")
    jump = subprocess.run(["ssh", "-F", str(config), "-J", f"alice@127.0.0.1:{fleet.b.port}",
                           "root@site-a", "echo end-to-end"], capture_output=True, timeout=30)
    assert (jump.returncode, jump.stdout) == (0, b"end-to-end\n"), jump.stderr
    stdio = subprocess.run(["ssh", "-F", str(config), "-p", str(fleet.b.port), "-W",
                            "site-a:22", "alice@127.0.0.1"], input=b"", capture_output=True,
                           timeout=30)
    assert stdio.stdout.startswith(b"SSH-2.0-OpenSSH"), stdio.stderr
    audit = [e for e in fleet.b.cli("audit", "--json").stdout.decode().splitlines()]
    assert any('"jump"' in line for line in audit)


def test_a_nodes_port_answers_on_the_other_hub_too(fleet: Fleet) -> None:
    [port] = fleet.device.forwards().values()
    fleet.b.cli("access", "site-a", "on")

    def banner(host: str) -> bytes:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                return s.recv(100)
        except OSError:
            return b""

    wait_for(lambda: banner("127.0.0.3").startswith(b"SSH-2.0-OpenSSH"), 10,
             "the port on hub A's public interface")
    wait_for(lambda: banner("127.0.0.2").startswith(b"SSH-2.0-OpenSSH"), 10,
             "the port on hub B's public interface, relayed to hub A")
    # While it was on loopback, hub A held it there: hub B skipped it quietly.
    assert "port {port} not relayed here" not in fleet.b.log_text()
    assert f"port 127.0.0.2:{port} relayed to its hub" in fleet.b.log_text()


def test_a_revoke_on_hub_b_drops_the_session_on_hub_a(fleet: Fleet) -> None:
    assert fleet.device.proc is not None
    fleet.b.cli("revoke", "site-a")
    started = time.monotonic()  # committed: hub A polls the registry every 0.25 s
    wait_for(lambda: fleet.device.proc is not None and fleet.device.proc.poll() is not None,
             2, "the device's session on hub A to be dropped")
    assert time.monotonic() - started < 2.0
    assert "node site-a revoked: dropping its live session" in fleet.a.log_text()


def test_a_device_of_a_killed_hub_comes_back_on_the_other_with_its_ports(
        fleet: Fleet) -> None:
    [port] = fleet.device.forwards().values()
    fleet.a.stop(signal.SIGKILL)
    fleet.device.close()
    # The device calls hub B (DNS round robin or a load balancer would send it there).
    fleet.device.hub = fleet.b
    fleet.device.connect(f"0:127.0.0.1:{fleet.sshd.port}")
    assert fleet.device.forwards() == {"ssh": port}
    assert fleet.device.allocated() == [port]
    record = node(fleet.b, "site-a")
    assert record["online"]
    result = fleet.operator(fleet.b).run("alice:site-a@127.0.0.1", "echo back",
                                         key=fleet.alice)
    assert (result.returncode, result.stdout) == (0, b"back\n"), result.stderr
