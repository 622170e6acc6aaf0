from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import LogEvent, globalLogPublisher

sys.path.insert(0, str(Path(__file__).parent))

from helpers import SSH, HubProcess, SSHClient
from postgres import Cluster

CALLHOME_PASSWORD = "s3cret-callhome"
DEVICE_USER = f"chdev{os.getpid()}"  # per run: concurrent runs must not share an account


@pytest.fixture
def device_user() -> Iterator[tuple[str, str]]:
    """A throwaway local account with a password, for a device's sshd (enrollment)."""
    if os.geteuid() != 0:
        pytest.skip("creating a device account needs root")
    password = secrets.token_urlsafe(12)
    subprocess.run(["userdel", "-r", DEVICE_USER], capture_output=True)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", DEVICE_USER], check=True,
                   capture_output=True)
    subprocess.run(["chpasswd"], input=f"{DEVICE_USER}:{password}".encode(), check=True)
    yield DEVICE_USER, password
    subprocess.run(["userdel", "-r", DEVICE_USER], capture_output=True)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A running hub with a Call Home Password set."""
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    process = HubProcess(tmp_path / "hub", "--keepalive", "2")
    process.data.mkdir(parents=True)
    process.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    process.start()
    yield process
    process.stop()


@pytest.fixture
def client(hub: HubProcess, tmp_path: Path) -> SSHClient:
    return SSHClient(tmp_path / "client", hub.port)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every log event emitted while the test runs."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throwaway PostgreSQL server (tests/postgres.py), started on first use."""
    try:
        cluster = Cluster()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_at(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a registry test's registry lives, for each engine: a SQLite file in the
    test's temp dir, or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "hub.sqlite3")
    cluster: Cluster = request.getfixturevalue("postgres")
    return cluster.database()
