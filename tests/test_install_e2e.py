"""The wheel on its own: installed into a clean venv, `twistd callhomehub` and the CLI work
from any directory, without the checkout on sys.path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path, stdin: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300, input=stdin)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def compiler_here() -> bool:
    """A C compiler and this Python's headers: what building hub/intake/_nsca.c takes."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which("cc") is not None and headers.exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built once: setuptools builds in the checkout's build/, so two builds at
    once (two test workers) would trip over each other's files there."""
    vendor = ROOT / "hub" / "web" / "static" / "vendor" / "xterm"
    if not (vendor / "xterm.js").exists():
        pytest.fail("hub/web/static/vendor/xterm/ is missing: run ./run-tests (set-up) first")
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, ROOT, cwd=dist)
    (built,) = dist.glob("callhomehub-*.whl")
    return built


def test_the_wheel_gives_twistd_callhomehub_and_the_cli(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(venv / "bin" / "python", "-c", "import hub; print(hub.__file__)", cwd=elsewhere)
    assert where.startswith(str(venv))
    # The NSCA decoder's C part (setup.py) is in the wheel wherever it could be compiled.
    compiled = run(venv / "bin" / "python", "-c",
                   "from hub.intake import nsca; print(nsca.unpack_c is not None)", cwd=elsewhere)
    assert compiled.strip() == str(compiler_here())
    assert "Usage: twistd [options] callhomehub" in run(
        venv / "bin" / "twistd", "callhomehub", "--help", cwd=elsewhere)
    assert run(venv / "bin" / "twistd", "callhomehub", "--version", cwd=elsewhere).startswith(
        "callhomehub ")
    # The schema's .sql migrations ship too: the CLI can create a registry.
    data = tmp_path / "data"
    run(venv / "bin" / "callhomehub", "--data", data, "callhome-password", cwd=elsewhere,
        stdin="long-random-secret")
    assert (data / "hub.sqlite3").stat().st_mode & 0o777 == 0o600


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "contrib" / "systemd" / "callhomehub.service").read_text()
    for directive in ("User=callhomehub", "StateDirectory=callhomehub",
                      "AmbientCapabilities=CAP_NET_BIND_SERVICE", "LimitNOFILE=65536",
                      "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                      "PrivateTmp=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert f"\n{directive}\n" in unit, directive
    # verify checks that ExecStart's program exists: use this venv's twistd for /opt's.
    twistd = Path(sys.executable).parent / "twistd"
    (tmp_path / "callhomehub.service").write_text(
        unit.replace("/opt/callhomehub/bin/twistd", str(twistd)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "callhomehub.service")],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_wheel_carries_the_web_terminal_and_xterm_js(wheel: Path) -> None:
    """xterm.js is fetched from npm at set-up (scripts/bootstrap.sh) and ships in the wheel."""
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("vendor/xterm/xterm.js", "vendor/xterm/xterm.css", "vendor/xterm/addon-fit.js",
                 "vendor/xterm/LICENSE.xterm", "vendor/xterm/LICENSE.addon-fit",
                 "terminal.js", "terminal.css"):
        assert f"hub/web/static/{name}" in names, name
