"""`/metrics` of a real hub, scraped over HTTP while a real `ssh -R` device is connected."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import SSH, HubProcess, SSHClient, metrics_port, scrape, value, wait_for
from tunnel_helpers import Device, Listener

import hub as hub_package

pytestmark = pytest.mark.e2e

@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    process = HubProcess(tmp_path / "hub", "--keepalive", "2",
                         "--metrics", "tcp:0:interface=127.0.0.1")
    process.data.mkdir(parents=True)
    process.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    process.start()
    yield process
    process.stop()


def test_metrics_of_a_running_hub(hub: HubProcess, tmp_path: Path) -> None:
    port = metrics_port(hub)
    web = Listener(lambda conn: (conn.recv(100), conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello"),
                                 conn.close()))
    device = Device(hub, tmp_path, "site-a")  # registers with the Call Home Password
    wrong = SSHClient(tmp_path / "wrong", hub.port).run("cms@127.0.0.1", "register", "x",
                                                       password="not-the-password")
    assert wrong.returncode != 0
    device.connect(f"app:0:127.0.0.1:{web.port}")
    try:
        forwards = device.forwards()
        with socket.create_connection(("127.0.0.1", forwards["app"]), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # 18 bytes
            assert s.makefile("rb").read() == b"HTTP/1.0 200 OK\r\n\r\nhello"  # 24 bytes

        samples = scrape(port)
        assert value(samples, "callhomehub_nodes", state="pending") == 1
        assert value(samples, "callhomehub_nodes", state="approved") == 0
        assert value(samples, "callhomehub_tunnels_online") == 1
        assert value(samples, "callhomehub_forwards") == 1
        assert value(samples, "callhomehub_sdt_ports_open", interface="loopback") == 1
        assert value(samples, "callhomehub_sdt_ports_open", interface="public") == 0
        assert value(samples, "callhomehub_tunnel_bytes_total", direction="to_device") == 18
        assert value(samples, "callhomehub_tunnel_bytes_total", direction="from_device") == 24
        assert value(samples, "callhomehub_auth_failures_total", kind="password") == 1
        assert value(samples, "callhomehub_auth_failures_total", kind="invalid_user") == 0
        assert value(samples, "callhomehub_registry_transaction_seconds_count") >= 2
        assert value(samples, "callhomehub_build_info", version=hub_package.__version__) == 1
        assert value(samples, "process_open_fds") > 0
    finally:
        device.close()
        web.close()
    wait_for(lambda: value(scrape(port), "callhomehub_tunnels_online") == 0, 10,
             "the tunnel to go")
    # Only /metrics (and a link to it at /) is served.
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nodes", timeout=10)
    assert missing.value.code == 404
