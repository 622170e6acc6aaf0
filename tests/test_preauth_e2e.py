"""A flood of silent connections against the real hub: devices still log in."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import HubProcess, SSHClient, make_key, wait_for

pytestmark = pytest.mark.e2e

FLOOD = 300
NO_SHELL = b"does not have shell access"


@pytest.fixture
def flood(hub: HubProcess) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def open_silent(port: int, source: str, count: int, into: list[socket.socket]) -> None:
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.bind((source, 0))
        s.connect_ex(("127.0.0.1", port))
        into.append(s)


def key_login(client: SSHClient, key: Path, source: str) -> float:
    start = time.monotonic()
    result = client.run("cms@127.0.0.1", "true", key=key, options=["-b", source], timeout=20)
    took = time.monotonic() - start
    assert NO_SHELL in result.stderr, result.stderr
    return took


def test_devices_log_in_during_a_flood_of_silent_connections(
        hub: HubProcess, client: SSHClient, tmp_path: Path, flood: list[socket.socket]) -> None:
    key = make_key(tmp_path / "dev", "dev")
    registered = client.run("cms@127.0.0.1", "register", "site-a", password=CALLHOME_PASSWORD,
                            stdin=Path(f"{key}.pub").read_bytes())
    assert registered.returncode == 0, registered.stderr
    # The device has logged in from the shared address before the flood.
    key_login(client, key, "127.0.0.2")
    open_silent(hub.port, "127.0.0.2", FLOOD, flood)
    wait_for(lambda: "connection from 127.0.0.2: its address is at its cap" in hub.log_text(),
             10, "the hub to cap the flood")
    assert key_login(client, key, "127.0.0.3") < 2.0
    assert key_login(client, key, "127.0.0.2") < 2.0
    # One refusal line per reason, not one per connection.
    assert hub.log_text().count("connection from 127.0.0.2: ") < 10
