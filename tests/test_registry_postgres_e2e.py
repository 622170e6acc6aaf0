"""A real hub on a PostgreSQL registry: a device registers with `ssh` and calls home,
and the admin CLI's changes on that registry reach the running hub within 2 s."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import SSH, HubProcess, wait_for
from postgres import Cluster
from tunnel_helpers import Device, Listener

from hub.store.registry import Registry

pytestmark = pytest.mark.e2e


def refused(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def test_hub_on_postgres_sees_the_clis_changes_within_two_seconds(
        postgres: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    url = postgres.database()
    monkeypatch.setenv("CALLHOMEHUB_REGISTRY", url)  # for the CLI (hub.cli)
    # 127.0.0.2 stands for the hub's public address (all of 127/8 is loopback).
    hub = HubProcess(tmp_path / "hub", "--registry", url, "--public-interface", "127.0.0.2")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    web = Listener(lambda conn: (conn.sendall(b"x"), conn.close()))
    device: Device | None = None
    try:
        device = Device(hub, tmp_path, "site-a")
        registry = Registry(url, now=time.time)
        assert registry.node("site-a").state == "pending"
        hub.cli("approve", "site-a")
        device.connect(f"0:127.0.0.1:{web.port}")
        port = registry.node("site-a").forwards["ssh"]
        assert refused(port, "127.0.0.2") and not refused(port)
        hub.cli("access", "site-a", "on")
        wait_for(lambda: not refused(port, "127.0.0.2"), 2, "the public listener")
        hub.cli("revoke", "site-a")
        proc = device.proc
        assert proc is not None
        wait_for(lambda: proc.poll() is not None, 2, "the revoked device's session to end")
        assert not (hub.data / "hub.sqlite3").exists()
        assert (hub.data / "keys").is_dir()
    finally:
        if device is not None:
            device.close()
        web.close()
        hub.stop()
