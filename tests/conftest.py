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

from hub.ssh.loglevel import GatedLogger

CALLHOME_PASSWORD = "s3cret-callhome"
DEVICE_USER = f"chdev{os.getpid()}"  # per run: concurrent runs must not share an account


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`, keep the users of one shared fixture on one worker.

    A fixture of ours scoped wider than a test would otherwise be set up again on
    each worker that gets one of its tests, at the same time: a module's hub or fuzz
    run on two workers at once, a session's server once per worker. Its tests go to
    one group instead: the module (module or class scope) or the fixture's name
    (package or session scope), the widest one a test uses. A test that names its
    own group with @pytest.mark.xdist_group keeps it."""
    root = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        info = getattr(item, "_fixtureinfo", None)
        groups: list[tuple[int, str]] = []
        for name, defs in (info.name2fixturedefs.items() if info is not None else ()):
            fixture = defs[-1]
            scope = fixture.scope
            if scope == "function" or not _ours(fixture.func, root):
                continue
            if scope in ("session", "package"):
                groups.append((0, f"fixture-{name}"))
            else:
                groups.append((1, item.nodeid.split("::", 1)[0]))
        if groups:
            item.add_marker(pytest.mark.xdist_group(min(groups)[1]))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's worker sends the ids
def pytest_collection_finish(session: pytest.Session) -> None:
    """Put each test's group into its node id, as pytest-xdist's worker means to.

    pytest-xdist 3.8 writes `item._nodeid`, which pytest 9.2 no longer reads (the id
    lives in `item._id`): without this, `--dist loadgroup` silently groups nothing.
    Here, after -k, -m and --deselect have chosen the tests by their plain ids."""
    if not session.config.getoption("loadgroup", default=False):
        return
    for item in session.items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if not names or "@" in item.nodeid:
            continue
        nodeid = f"{item.nodeid}@{'_'.join(names)}"
        if hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id
            item._id = coerce_node_id(nodeid)
        else:
            item._nodeid = nodeid


def _ours(func: object, root: Path) -> bool:
    """Whether a fixture is defined under tests/ (not by pytest or a plugin)."""
    code = getattr(getattr(func, "__wrapped__", func), "__code__", None)
    return code is not None and Path(code.co_filename).is_relative_to(root)


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
    process.set_callhome_password(CALLHOME_PASSWORD)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def client(hub: HubProcess, tmp_path: Path) -> SSHClient:
    return SSHClient(tmp_path / "client", hub.port)


@pytest.fixture(autouse=True)
def every_log_level() -> Iterator[None]:
    """A test that builds the hub's service with a log level (`--log-level warn`)
    sets the lowest level the SSH classes log for the whole process
    (`GatedLogger.drop_below`): the next test starts from no level dropped."""
    yield
    GatedLogger.dropped = frozenset()


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
