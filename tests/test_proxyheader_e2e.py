"""A real HAProxy (`send-proxy-v2`) in front of the hub, real `ssh` devices behind it:
the hub sees, logs and records each device's own address, not the balancer's."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import SSH, HubProcess, SSHClient, free_port, make_key, wait_for
from tunnel_helpers import node

pytestmark = pytest.mark.e2e

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                      if Path("/usr/sbin/haproxy").exists() else None)
# Linux answers on all of 127/8: the devices and the balancer each get an address.
BALANCER = "127.0.0.1"
DEVICE = "127.0.0.5"
DIRECT = "127.0.0.6"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    if SSH is None or HAPROXY is None:
        pytest.skip("needs the OpenSSH client and haproxy")
    process = HubProcess(tmp_path / "hub")
    process.data.mkdir(parents=True)
    (process.data / "callhomehub.toml").write_text(
        f'[ssh]\nproxy_protocol_from = ["{BALANCER}"]\n')
    process.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    process.start(ssh_endpoint="tcp:0")  # on every address: devices come from 127.0.0.x
    yield process
    process.stop()


@pytest.fixture
def balancer(hub: HubProcess, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend callhome
    bind {BALANCER}:{port}
    default_backend hubs
backend hubs
    server hub {BALANCER}:{hub.port} send-proxy-v2 source {BALANCER}
""")
    assert HAPROXY is not None
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _listening(port), 10, "haproxy to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((BALANCER, port)) == 0


def test_devices_behind_haproxy_are_seen_with_their_own_addresses(
        hub: HubProcess, balancer: int, tmp_path: Path) -> None:
    client = SSHClient(tmp_path / "ssh", balancer)
    key = make_key(tmp_path / "site-a-key", "site-a")
    bind = ["-o", f"BindAddress={DEVICE}"]
    registered = client.run("cms@127.0.0.1", "register", "site-a", password=CALLHOME_PASSWORD,
                            stdin=Path(f"{key}.pub").read_bytes(), options=bind)
    assert registered.returncode == 0, registered.stderr
    refused = client.run("cms@127.0.0.1", key=key, options=bind)
    assert b"does not have shell access" in refused.stdout + refused.stderr
    log = hub.log_text()
    assert re.search(rf"Accepted publickey for cms from {re.escape(DEVICE)} port \d+ ssh2", log)
    assert f"from {BALANCER} port" not in log  # nothing logged as the balancer
    # The node's peer is the device's address (what `callhomehub nodes` shows).
    wait_for(lambda: node(hub, "site-a").get("peer") == DEVICE, 10, "the node's peer")
    # Another address is not trusted for headers: it connects with plain SSH.
    direct = SSHClient(tmp_path / "ssh-direct", hub.port)
    plain = direct.run("cms@127.0.0.1", key=key, options=["-o", f"BindAddress={DIRECT}"])
    assert b"does not have shell access" in plain.stdout + plain.stderr
    assert re.search(rf"Accepted publickey for cms from {re.escape(DIRECT)} port",
                     hub.log_text())
    assert "Traceback" not in hub.log_text()
