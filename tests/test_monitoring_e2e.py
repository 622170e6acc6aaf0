"""NSCA intake end to end: the real send_nsca through a device's `ssh -L` tunnel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import CLI, HubProcess, free_port, wait_for
from tunnel_helpers import Device

pytestmark = pytest.mark.e2e

SEND_NSCA = shutil.which("send_nsca") or (
    "/usr/sbin/send_nsca" if os.access("/usr/sbin/send_nsca", os.X_OK) else None)
RECORDS = (b"site-a\tload\t1\tWARNING - load 4.2\x17"
           b"site-a\tdisk\t0\tOK - 42% used\\nsecond line\x17"
           b"site-a\t2\tDOWN - uplink lost\x17")


def start_hub(tmp_path: Path, config: str, *args: str) -> HubProcess:
    hub = HubProcess(tmp_path / "hub", *args)
    hub.data.mkdir(parents=True, exist_ok=True)
    (hub.data / "callhomehub.toml").write_text(config)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    return hub.start()


def send_nsca(port: int, cfg: Path, records: bytes, *extra: str) -> subprocess.CompletedProcess:
    assert SEND_NSCA is not None
    return subprocess.run([SEND_NSCA, "-H", "127.0.0.1", "-p", str(port), "-c", str(cfg),
                           "-to", "10", *extra], input=records, capture_output=True, timeout=30)


def write_cfg(tmp_path: Path, method: int, password: str) -> Path:
    cfg = tmp_path / f"send_nsca-{method}.cfg"
    # send_nsca refuses an empty `password=` line: leave it out instead.
    cfg.write_text((f"password={password}\n" if password else "")
                   + f"encryption_method={method}\n")
    return cfg


@pytest.fixture
def local_forward(tmp_path: Path) -> Iterator[None]:
    if SEND_NSCA is None:
        pytest.skip("send_nsca (Debian nsca-client) is not installed")
    yield


def status(hub: HubProcess, *args: str) -> list[dict]:
    return json.loads(hub.cli("status", *args, "--json").stdout)


@pytest.mark.parametrize("method", [0, 1, 3, 14])
def test_send_nsca_through_the_tunnel(tmp_path: Path, local_forward: None, method: int) -> None:
    hub = start_hub(tmp_path, f'[nsca]\npassword = "n5ca-pw"\nencryption = {method}\n')
    device = Device(hub, tmp_path, "site-a")
    hub.cli("approve", "site-a")  # results from pending nodes are dropped
    local = free_port()
    try:
        device.connect(wait=False, extra=("-L", f"{local}:localhost:5667"))
        wait_for(lambda: device.forwards() == {} and
                 json.loads(hub.cli("nodes", "--json").stdout)[0]["online"], 20, "the tunnel")
        cfg = write_cfg(tmp_path, method, "n5ca-pw")
        result = wait_for(lambda: (r := send_nsca(local, cfg, RECORDS)).returncode == 0 and r,
                          20, "send_nsca through the local forward")
        assert b"3 data packet(s) sent" in result.stdout
        got = {(s["host"], s["service"]): s for s in status(hub, "site-a")}
        assert set(got) == {("site-a", "load"), ("site-a", "disk"), ("site-a", "")}
        assert got[("site-a", "load")]["code"] == 1
        assert got[("site-a", "load")]["output"] == "WARNING - load 4.2"
        assert got[("site-a", "")]["code"] == 2
        assert all(s["node"] == "site-a" for s in got.values())
        assert {(s["node"], s["service"]) for s in status(hub, "SITE-A")} == {
            ("site-a", "load"), ("site-a", "disk"), ("site-a", "")}
        unknown = subprocess.run([CLI, "--data", str(hub.data), "status", "other-node"],
                                 capture_output=True, text=True, timeout=30)
        assert (unknown.returncode, unknown.stderr) == (
            1, "callhomehub: no node named 'other-node'\n")
    finally:
        device.close()
        hub.stop()


def test_legacy_packets_wrong_password_and_history(tmp_path: Path, local_forward: None) -> None:
    hub = start_hub(tmp_path, '[nsca]\npassword = "pw"\nencryption = 1\nhistory = 3\n',
                    "--nsca", "tcp:0:interface=127.0.0.1")
    port = hub.ports["NSCA"]
    cfg = write_cfg(tmp_path, 1, "pw")
    try:
        usage = subprocess.run([SEND_NSCA, "-h"], capture_output=True)  # type: ignore[list-item]
        if b"legacy" in usage.stdout + usage.stderr:
            assert send_nsca(port, cfg, b"lab\tping\t0\tlegacy ok\n",
                             "--legacy-2-7-mode").returncode == 0
            wait_for(lambda: any(s["output"] == "legacy ok" for s in status(hub)), 10)
        bad = send_nsca(port, write_cfg(tmp_path / "..", 1, "wrong"), b"lab\tping\t2\tspoof\n")
        assert bad.returncode == 0  # send_nsca cannot tell; the hub logs and drops it
        wait_for(lambda: "NSCA" in hub.log_text() and "rejected" in hub.log_text(), 10)
        assert not any(s["output"] == "spoof" for s in status(hub))
        for i in range(6):
            assert send_nsca(port, cfg, f"lab\tping\t0\trun {i}\n".encode()).returncode == 0
        [latest] = [s for s in status(hub) if s["service"] == "ping"]
        assert latest["output"] == "run 5" and latest["node"] == ""
        import sqlite3
        db = sqlite3.connect(hub.data / "hub.sqlite3")
        kept = db.execute("SELECT COUNT(*) FROM results WHERE service = 'ping'").fetchone()[0]
        assert kept == 3
    finally:
        hub.stop()


def test_command_file_and_strict_host(tmp_path: Path, local_forward: None) -> None:
    fifo = tmp_path / "nagios.cmd"
    os.mkfifo(fifo)  # nobody reads it yet: the hub must not block
    hub = start_hub(tmp_path, '[nsca]\nencryption = 0\nstrict_host = true\n',
                    "--command-file", str(fifo))
    device = Device(hub, tmp_path, "site-a")
    local = free_port()
    try:
        device.connect(wait=False, extra=("-L", f"{local}:localhost:5667"))
        cfg = write_cfg(tmp_path, 0, "")
        # Pending (anyone with the Call Home Password): its results are dropped.
        forged = b"prod-1\tload\t2\tCRITICAL forged\x17site-a\tload\t2\tpending\x17"
        wait_for(lambda: send_nsca(local, cfg, forged).returncode == 0, 20, "send_nsca")
        wait_for(lambda: "node site-a dropped: the node is pending" in hub.log_text(), 10)
        assert status(hub) == []
        hub.cli("approve", "site-a")
        records = b"site-a\tload\t0\tOK\x17spoofed-host\tload\t2\tfake\x17"
        assert send_nsca(local, cfg, records).returncode == 0
        assert [(s["host"], s["service"]) for s in status(hub)] == [("site-a", "load")]
        assert "dropped (strict_host)" in hub.log_text()
        # The hub stayed responsive while the FIFO had no reader.
        assert hub.cli("nodes").returncode == 0
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            def line() -> bytes:
                try:
                    return os.read(fd, 65536)
                except BlockingIOError:
                    return b""
            data = wait_for(line, 10, "the command file line")
            assert b"] PROCESS_SERVICE_CHECK_RESULT;site-a;load;0;OK\n" in data  # type: ignore[operator]
        finally:
            os.close(fd)
    finally:
        device.close()
        hub.stop()


def test_unsupported_method_stops_start_up(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub")
    hub.data.mkdir(parents=True)
    (hub.data / "callhomehub.toml").write_text("[nsca]\nencryption = 8\n")
    with pytest.raises(AssertionError, match=r"\[nsca\] encryption: NSCA encryption method 8"):
        hub.start()
