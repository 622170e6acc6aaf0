"""`callhomehub run` against real devices: 20 nodes calling home with the real ssh
client, one real sshd behind every tunnel, 3 of them offline."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import DeviceSSHD, HubProcess, wait_for
from tunnel_helpers import Device, node

pytestmark = pytest.mark.e2e


def test_run_reaches_the_online_nodes_and_reports_the_rest(hub: HubProcess,
                                                           tmp_path: Path) -> None:
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    sshd = DeviceSSHD(tmp_path / "sshd", [mgmt]).start()
    def call_home(name: str) -> Device:
        device = Device(hub, tmp_path, name)
        device.connect(f"0:127.0.0.1:{sshd.port}")
        hub.cli("approve", device.name)  # verifies the login, pins the host key
        return device

    with ThreadPoolExecutor(4) as pool:  # 20 devices one after another take too long
        devices = list(pool.map(call_home, [f"site-{i:02d}" for i in range(20)]))
    try:
        for device in devices[:3]:
            device.close()
        wait_for(lambda: not any(node(hub, d.name)["online"] for d in devices[:3]), 10,
                 "three nodes offline")

        result = hub.cli("run", "--nodes", "SITE-*", "--parallel", "5", "--",
                         "echo", "hi from", "$(id -un)", check=False)
        out = result.stdout.decode()
        assert result.returncode == 1, out  # three nodes did not run it
        for device in devices[3:]:
            assert f"== {device.name}: ok (exit 0)\nhi from root\n" in out
        for device in devices[:3]:
            assert f"== {device.name}: offline (no tunnel now)\n" in out
        assert out.endswith("20 node(s): ok 17, failed 0, offline 3, timed out 0, error 0\n")

        result = hub.cli("run", "--nodes", "site-1*", "--json", "--", "echo oops >&2; exit 7",
                         check=False)
        rows = json.loads(result.stdout)
        assert result.returncode == 1
        assert [(r["node"], r["status"], r["exit"], r["stderr"]) for r in rows] == [
            (f"site-{i}", "failed", 7, "oops\n") for i in range(10, 20)]

        started = time.monotonic()
        result = hub.cli("run", "--nodes", "site-05", "--timeout", "2", "--", "sleep 30",
                         check=False)
        assert result.returncode == 1 and time.monotonic() - started < 10
        assert "== site-05: timed out (no answer within 2 s)" in result.stdout.decode()

        nothing = hub.cli("run", "--nodes", "nosuch*", "--", "true", check=False)
        assert nothing.returncode == 1
        assert b"no approved node matches 'nosuch*'" in nothing.stderr

        runs = [e for e in json.loads(hub.cli("audit", "--json").stdout)
                if e["action"] == "run"]
        assert [e["target"] for e in runs] == ["SITE-*", "site-1*", "site-05", "nosuch*"]
        assert "ok 17" in runs[0]["detail"] and "offline 3" in runs[0]["detail"]
    finally:
        for device in devices:
            device.close()
        sshd.stop()
