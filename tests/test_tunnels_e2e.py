"""Call-home tunnels with the real `ssh -R` client and a real sshd as the device."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DeviceSSHD, HubProcess, make_key, sdt_port_range, wait_for
from tunnel_helpers import (
    ALLOCATED,
    Device,
    Listener,
    PatternStream,
    Sink,
    Source,
    listening_ports,
    node,
    rss_kib,
    wait_stalled,
)

pytestmark = pytest.mark.e2e

LOW, HIGH = sdt_port_range()  # the `hub` fixture's range


@pytest.fixture
def device_sshd(tmp_path: Path) -> Iterator[tuple[DeviceSSHD, Path]]:
    operator_key = make_key(tmp_path / "operator", "operator")
    sshd = DeviceSSHD(tmp_path / "sshd", [operator_key]).start()
    yield sshd, operator_key
    sshd.stop()


def ssh_to(port: int, key: Path, command: str, host: str = "127.0.0.1"
           ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-i", str(key), f"root@{host}", command],
        capture_output=True, timeout=30)


def refused(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def test_reverse_forwards_reach_the_device(hub: HubProcess, tmp_path: Path,
                                           device_sshd: tuple[DeviceSSHD, Path]) -> None:
    sshd, operator_key = device_sshd
    web = Listener(lambda conn: (conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello"), conn.close()))
    device = Device(hub, tmp_path, "site-a")
    device.connect(f"0:127.0.0.1:{sshd.port}", f"80:127.0.0.1:{web.port}",
                   f"app:0:127.0.0.1:{web.port}")
    try:
        forwards = device.forwards()
        assert set(forwards) == {"ssh", "http", "app"}
        assert len(set(forwards.values())) == 3
        assert all(LOW <= port <= HIGH for port in forwards.values())
        # OpenSSH learnt the allocated ports of the port-0 forwards.
        assert sorted(device.allocated()) == sorted([forwards["ssh"], forwards["app"]])
        # Bound on loopback only while public access is off.
        bound = listening_ports(LOW, HIGH)
        assert {bound[p] for p in forwards.values()} == {"127.0.0.1"}

        result = ssh_to(forwards["ssh"], operator_key, "echo hello from the device")
        assert (result.returncode, result.stdout) == (0, b"hello from the device\n")
        for service in ("http", "app"):
            with socket.create_connection(("127.0.0.1", forwards[service]), timeout=10) as s:
                assert s.makefile("rb").read() == b"HTTP/1.0 200 OK\r\n\r\nhello"
        listed = node(hub, "site-a")
        assert listed["online"] and listed["peer"] == "127.0.0.1"
        assert listed["online_since"] is not None
    finally:
        device.close()
        web.close()
    wait_for(lambda: not node(hub, "site-a")["online"], 10, "the node to go offline")
    assert all(refused(p) for p in forwards.values())
    offline = node(hub, "site-a")
    assert (offline["forwards"], offline["leases"]) == ({}, forwards)  # leases stay with it


def test_cancel_forward_releases_its_port(hub: HubProcess, tmp_path: Path) -> None:
    web = Listener(lambda conn: conn.close())
    device = Device(hub, tmp_path, "site-a")
    control = tmp_path / "ctl"
    device.connect(f"0:127.0.0.1:{web.port}", f"http:0:127.0.0.1:{web.port}",
                   extra=("-M", "-S", str(control)))
    try:
        forwards = device.forwards()
        result = device.client.run("cms@127.0.0.1", key=device.key, options=[
            "-S", str(control), "-O", "cancel", "-R", f"http:0:127.0.0.1:{web.port}"])
        assert result.returncode == 0, result.stderr
        wait_for(lambda: refused(forwards["http"]), 5, "the http port to close")
        assert not refused(forwards["ssh"])
    finally:
        device.close()
        web.close()


def test_reconnect_takes_over_with_the_same_ports(hub: HubProcess, tmp_path: Path) -> None:
    web = Listener(lambda conn: (conn.sendall(b"v"), conn.close()))
    specs = (f"0:127.0.0.1:{web.port}", f"http:0:127.0.0.1:{web.port}")
    first = Device(hub, tmp_path, "site-a")
    first.connect(*specs)
    ports = first.forwards()
    # The old connection still looks alive (its process is frozen, as after a
    # NAT rebinding); the new one must not wait for keepalives.
    first.kill(signal.SIGSTOP)
    second = Device.__new__(Device)
    second.__dict__.update(first.__dict__)
    second.proc = None
    try:
        second.connect(*specs)
        assert second.forwards() == ports
        assert sorted(second.allocated()) == sorted(ports.values())
        with socket.create_connection(("127.0.0.1", ports["http"]), timeout=10) as s:
            assert s.recv(1) == b"v"
        assert "reconnected from" in hub.log_text()
    finally:
        second.close()
        first.close()

    # Ports survive a hub restart.
    hub.stop()
    hub.start()
    third = Device.__new__(Device)
    third.__dict__.update(first.__dict__)
    third.proc = None
    try:
        third.connect(*specs)
        assert third.forwards() == ports
        assert sorted(third.allocated()) == sorted(ports.values())
    finally:
        third.close()
        web.close()


def test_vanished_device_is_dropped_by_keepalives(tmp_path: Path) -> None:
    from conftest import CALLHOME_PASSWORD
    hub = HubProcess(tmp_path / "hub", "--keepalive", "1", "--keepalive-count", "2")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    web = Listener(lambda conn: conn.close())
    device = Device(hub, tmp_path, "site-a")
    try:
        device.connect(f"0:127.0.0.1:{web.port}", extra=("-o", "ServerAliveInterval=0"))
        port = device.forwards()["ssh"]
        device.kill(signal.SIGSTOP)  # like a pulled cable: TCP stays, nothing answers
        wait_for(lambda: not node(hub, "site-a")["online"], 10, "keepalives to drop it")
        assert refused(port)
        assert node(hub, "site-a")["leases"] == {"ssh": port}
        assert "keepalives unanswered" in hub.log_text()
    finally:
        device.close()
        web.close()
        hub.stop()


def test_public_access_toggle(tmp_path: Path) -> None:
    from conftest import CALLHOME_PASSWORD
    # 127.0.0.2 stands for the hub's public address (all of 127/8 is loopback).
    hub = HubProcess(tmp_path / "hub", "--public-interface", "127.0.0.2")
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    web = Listener(lambda conn: (conn.sendall(b"x"), conn.close()))
    device = Device(hub, tmp_path, "site-a")
    try:
        device.connect(f"0:127.0.0.1:{web.port}")
        port = device.forwards()["ssh"]
        assert refused(port, "127.0.0.2") and not refused(port)
        hub.cli("access", "site-a", "on")
        wait_for(lambda: not refused(port, "127.0.0.2"), 3, "the public listener")
        assert refused(port)
        assert node(hub, "site-a")["public"]
        hub.cli("access", "site-a", "off")
        wait_for(lambda: refused(port, "127.0.0.2") and not refused(port), 3, "loopback again")
        audit = hub.cli("audit", "--json").stdout.decode()
        assert '"action": "access"' in audit and '"detail": "on"' in audit
    finally:
        device.close()
        web.close()
        hub.stop()


@contextlib.contextmanager
def squat_before_two_free_ports() -> Iterator[socket.socket]:
    """A listening socket on port P, with P+1 and P+2 free (other programs
    on a busy machine may hold ports too)."""
    for _ in range(50):
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        if port < 65534 and refused(port + 1) and refused(port + 2) and all(
                _bindable(p) for p in (port + 1, port + 2)):
            squatter.listen()
            with squatter:
                yield squatter
            return
        squatter.close()
    raise AssertionError("no port with two free ones above it")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def test_exhausted_range_and_taken_port(tmp_path: Path) -> None:
    from conftest import CALLHOME_PASSWORD
    with squat_before_two_free_ports() as squatter:
        taken = squatter.getsockname()[1]
        hub = HubProcess(tmp_path / "hub", "--port-range", f"{taken}-{taken + 2}")
        hub.data.mkdir(parents=True)
        hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
        hub.start()
        web = Listener(lambda conn: conn.close())
        a, b = Device(hub, tmp_path, "site-a"), Device(hub, tmp_path, "site-b")
        try:
            a.connect(f"0:127.0.0.1:{web.port}", f"http:0:127.0.0.1:{web.port}")
            # The squatted port was skipped; two ports remain and both went to site-a.
            assert sorted(a.forwards().values()) == [taken + 1, taken + 2]
            proc = b.connect(f"0:127.0.0.1:{web.port}", wait=False)
            assert proc.wait(20) == 255
            assert b"remote port forwarding failed" in b.stderr()
            assert "no free port left" in hub.log_text()
            assert not refused(a.forwards()["ssh"])  # nothing else was disturbed
        finally:
            a.close()
            b.close()
            web.close()
            hub.stop()


def test_password_login_cannot_forward(hub: HubProcess, tmp_path: Path) -> None:
    from conftest import CALLHOME_PASSWORD
    device = Device(hub, tmp_path, "site-a")
    result = device.client.run("cms@127.0.0.1", password=CALLHOME_PASSWORD, options=[
        "-N", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO", "-R", "0:127.0.0.1:22"])
    assert result.returncode == 255 and b"remote port forwarding failed" in result.stderr
    assert "only a registered node's key may forward" in hub.log_text()


@pytest.mark.parametrize("direction", ["to-device", "from-device"])
def test_fast_sender_slow_reader_bounded_memory(hub: HubProcess, tmp_path: Path,
                                                direction: str) -> None:
    total = 256 * 1024 * 1024
    stream = PatternStream(total)
    gate = threading.Event()
    sinks: list[Sink] = []
    sources: list[Source] = []
    if direction == "to-device":
        device_server = Listener(lambda conn: sinks.append(Sink(conn, gate)))
    else:
        device_server = Listener(lambda conn: sources.append(Source(conn, stream)))
    device = Device(hub, tmp_path, "site-a")
    device.connect(f"0:127.0.0.1:{device_server.port}")
    port = device.forwards()["ssh"]
    pid = hub.proc.pid  # type: ignore[union-attr]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as hub_side:
            hub_side.settimeout(None)
            before = rss_kib(pid)
            if direction == "to-device":
                source = Source(hub_side, stream)
                wait_stalled(lambda: source.sent)
            else:
                wait_for(lambda: sources, 10, "the device-side connection")
                source = sources[0]
                wait_stalled(lambda: source.sent)
            grown = rss_kib(pid) - before
            assert source.sent < total, "the sender was never held back"
            assert grown < 32 * 1024, f"hub RSS grew by {grown} KiB with a stalled reader"
            if direction == "to-device":
                gate.set()
                source.thread.join(120)
                wait_for(lambda: sinks and not sinks[0].thread.is_alive(), 60, "the sink")
                sink = sinks[0]
            else:
                sink = Sink(hub_side)
                sink.thread.join(120)
                source.thread.join(10)
            # Both ends finished: the data and the EOF after it arrived.
            assert not source.thread.is_alive() and not sink.thread.is_alive()
            assert source.error is None
            assert sink.count == total
            assert sink.hash.hexdigest() == stream.digest()
    finally:
        gate.set()
        device.close()
        device_server.close()


def test_duplicate_and_excess_forwards_fail_the_ssh_client(hub: HubProcess,
                                                           tmp_path: Path) -> None:
    device = Device(hub, tmp_path, "site-a")
    # The same bind and port twice: OpenSSH got "Allocated port N" twice for
    # one N, and ExitOnForwardFailure never fired.
    twice = device.client.run("cms@127.0.0.1", key=device.key, options=[
        "-N", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO",
        "-R", "0:localhost:22", "-R", "0:localhost:80"])
    assert twice.returncode == 255 and b"remote port forwarding failed" in twice.stderr
    assert len(ALLOCATED.findall(twice.stderr)) == 1
    assert "is already forwarded on port" in hub.log_text()
    # A pending node holds three forwards at most.
    four = device.client.run("cms@127.0.0.1", key=device.key, options=[
        "-N", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO",
        *[arg for i in range(4) for arg in ("-R", f"s{i}:0:localhost:22")]])
    assert four.returncode == 255 and b"remote port forwarding failed" in four.stderr
    # Its sticky lease of "ssh" counts: two more services, not three.
    assert "pending nodes may hold at most 3 port leases (s0, s1, ssh)" in hub.log_text()
    assert set(node(hub, "site-a")["leases"]) == {"ssh", "s0", "s1"}  # the client has gone


def test_a_second_login_without_forwards_keeps_the_tunnel(hub: HubProcess,
                                                          tmp_path: Path) -> None:
    # The web server closes only after the client: the hub's end of the port
    # must not be left in TIME-WAIT, where a later test binds the same port.
    web = Listener(lambda conn: (conn.sendall(b"v"), conn.recv(1), conn.close()))
    device = Device(hub, tmp_path, "site-a")
    device.connect(f"http:0:127.0.0.1:{web.port}")
    try:
        port = device.forwards()["http"]
        # A re-register and a stray `ssh cms@hub` with the device's key.
        again = device.client.run("cms@127.0.0.1", "register", "site-a", key=device.key,
                                  stdin=Path(f"{device.key}.pub").read_bytes())
        assert again.returncode == 0, again.stderr
        by_hand = device.client.run("cms@127.0.0.1", key=device.key)
        assert by_hand.returncode == 1
        assert device.proc is not None and device.proc.poll() is None
        assert node(hub, "site-a")["online"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(1) == b"v"
        assert "reconnected from" not in hub.log_text()
    finally:
        device.close()
        web.close()


def test_a_stopped_hub_leaves_its_nodes_offline(hub: HubProcess, tmp_path: Path) -> None:
    """Stopping the hub disconnects the devices first, and their going offline is
    written before the registry thread stops."""
    web = Listener(lambda conn: conn.close())
    device = Device(hub, tmp_path, "site-a")
    device.connect(f"0:127.0.0.1:{web.port}")
    try:
        forwards = device.forwards()
        assert node(hub, "site-a")["online"]
        hub.stop()
        offline = node(hub, "site-a")
        assert not offline["online"] and offline["forwards"] == {}
        assert offline["leases"] == forwards
        assert "Traceback" not in hub.log.read_text()
    finally:
        device.close()
        web.close()


@pytest.mark.parametrize("cipher,mac", [
    ("chacha20-poly1305@openssh.com", None),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
    ("aes256-ctr", "hmac-sha2-512-etm@openssh.com"),
    ("aes128-gcm@openssh.com", None),  # cryptography's path, for contrast
], ids=["chacha20-poly1305", "aes128-ctr-sha256-etm", "aes256-ctr-sha512-etm", "aes128-gcm"])
def test_bulk_both_ways_with_each_packet_protection(hub: HubProcess, tmp_path: Path,
                                                     cipher: str, mac: str | None) -> None:
    # 8 MiB each way through a real `ssh -R` with the cipher forced: the hub seals
    # each read's CHANNEL_DATA packets with one call of its C packet layer (where it
    # has one for the cipher) and opens the device's one at a time; OpenSSH takes
    # and makes them byte-exact.
    total = 8 * 1024 * 1024
    stream = PatternStream(total)
    sinks: list[Sink] = []
    device_server = Listener(lambda conn: sinks.append(Sink(conn)))
    device = Device(hub, tmp_path, "site-a")
    extra = ("-o", f"Ciphers={cipher}", *(("-o", f"MACs={mac}") if mac else ()))
    device.connect(f"0:127.0.0.1:{device_server.port}", extra=extra)
    port = device.forwards()["ssh"]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as hub_side:
            source = Source(hub_side, stream)
            source.thread.join(60)
            wait_for(lambda: sinks and not sinks[0].thread.is_alive(), 60, "the device's sink")
            assert source.error is None
            assert (sinks[0].count, sinks[0].hash.hexdigest()) == (total, stream.digest())
        back = Listener(lambda conn: Source(conn, stream))
        device.close()
        device = Device(hub, tmp_path, "site-b")
        device.connect(f"0:127.0.0.1:{back.port}", extra=extra)
        with socket.create_connection(("127.0.0.1", device.forwards()["ssh"]),
                                      timeout=30) as hub_side:
            hub_side.settimeout(60)
            sink = Sink(hub_side)
            sink.thread.join(60)
            assert (sink.count, sink.hash.hexdigest()) == (total, stream.digest())
    finally:
        device.close()
