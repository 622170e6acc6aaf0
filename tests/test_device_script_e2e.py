"""device/callhome.sh run by dash (and busybox sh) against a real hub process.

The script is what a device runs: it registers once with the Call Home Password,
installs the hub's management key, then keeps `ssh -N cms@hub` up with back-off.
A wrapper `ssh` earlier in PATH records every ssh command line the script runs,
so the tests can check that the password never appears in one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import SSH, HubProcess, make_key, wait_for

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parent.parent / "device" / "callhome.sh"
DASH = "/bin/dash"
BUSYBOX = shutil.which("busybox")
TAKEN = "register: node name 'site-b' is already registered with another key"


def shells() -> list[object]:
    return [
        pytest.param([DASH], id="dash", marks=pytest.mark.skipif(
            not os.path.exists(DASH), reason="/bin/dash is not installed (apt-get install dash)")),
        pytest.param([BUSYBOX or "busybox", "sh"], id="busybox", marks=pytest.mark.skipif(
            BUSYBOX is None, reason="busybox is not installed")),
    ]


@pytest.fixture(autouse=True)
def _need_dash() -> None:
    if not os.path.exists(DASH):
        pytest.skip("/bin/dash is not installed (apt-get install dash)")


class Device:
    """One device: its own STATE, authorized_keys and an argv-logging ssh."""

    def __init__(self, root: Path, hub: HubProcess | None, shell: list[str] | None = None
                 ) -> None:
        self.root = root
        self.hub = hub
        self.shell = shell or [DASH]
        self.state = root / "state"
        self.home = root / "home"
        self.authorized_keys = self.home / ".ssh" / "authorized_keys"
        self.bin = root / "bin"
        self.argv_log = root / "ssh-argv.log"
        self.stderr = root / "stderr.log"
        self.bin.mkdir(parents=True)
        self.home.mkdir()
        wrapper = self.bin / "ssh"
        # printf is a shell builtin: logging the arguments shows nothing to ps itself.
        wrapper.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "$$ $*" >> {self.argv_log}\n'
                           f'exec {SSH} "$@"\n')
        wrapper.chmod(0o755)
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self, **settings: str) -> dict[str, str]:
        env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "HOME": str(self.home),
               "LANG": "C"}
        if self.hub is not None:
            env.update(HUB="127.0.0.1", HUB_PORT=str(self.hub.port))
        env.update(STATE=str(self.state), AUTHORIZED_KEYS=str(self.authorized_keys),
                   BACKOFF_MAX="2")
        env.update(settings)
        return env

    def run(self, *args: str, timeout: float = 30, **settings: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.shell, str(SCRIPT), *args], env=self.env(**settings),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, *args: str, **settings: str) -> subprocess.Popen[bytes]:
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen([*self.shell, str(SCRIPT), *args],
                                         env=self.env(**settings), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.ssh_pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def ssh_lines(self) -> list[str]:
        return self.argv_log.read_text().splitlines() if self.argv_log.exists() else []

    def ssh_pids(self) -> list[int]:
        return [int(line.split()[0]) for line in self.ssh_lines()]

    def log(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""


def alive(pid: int) -> bool:
    """Whether `pid` is still a running (not zombie) ssh process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"ssh" in cmdline


def nodes(hub: HubProcess) -> dict[str, dict]:
    return {n["name"]: n for n in json.loads(hub.cli("nodes", "--json").stdout)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def device(tmp_path: Path, hub: HubProcess) -> Iterator[Device]:
    d = Device(tmp_path / "device", hub)
    yield d
    d.stop()


# ---- without a hub -----------------------------------------------------------------


def test_script_is_posix_sh() -> None:
    subprocess.run([DASH, "-n", str(SCRIPT)], check=True)
    if BUSYBOX is not None:
        subprocess.run([BUSYBOX, "sh", "-n", str(SCRIPT)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (dash -n and busybox sh -n passed)")
    result = subprocess.run([shellcheck, "-s", "sh", str(SCRIPT)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def test_usage_and_setting_errors(tmp_path: Path) -> None:
    d = Device(tmp_path / "device", None)
    helped = d.run("-h")
    assert helped.returncode == 0 and "usage: callhome.sh" in helped.stdout
    assert "BACKOFF_MAX" in helped.stdout

    assert d.run("-x").returncode == 2
    missing = d.run("-c", str(tmp_path / "nope.conf"))
    assert missing.returncode == 2 and "no settings file" in missing.stderr
    no_hub = d.run("-r")
    assert no_hub.returncode == 2 and "HUB is not set" in no_hub.stderr

    conf = tmp_path / "bad.conf"
    conf.write_text("HUB=hub.example.net\nHUB_PROT=2222\n")
    unknown = d.run("-c", str(conf))
    assert unknown.returncode == 2 and "bad.conf:2: unknown setting 'HUB_PROT'" in unknown.stderr
    conf.write_text("HUB=hub.example.net\nCALLHOME_PASSWORD=x\n")
    assert "CALLHOME_PASSWORD_FILE" in d.run("-c", str(conf)).stderr
    bad_node = d.run("-r", HUB="hub.example.net", NODE="a b")
    assert bad_node.returncode == 2 and "NODE 'a b' is not a node name" in bad_node.stderr
    assert not d.ssh_lines()


def test_not_registered_without_password(tmp_path: Path) -> None:
    d = Device(tmp_path / "device", None)
    result = d.run("-1", HUB="127.0.0.1", HUB_PORT=str(free_port()), NODE="x")
    assert result.returncode == 1
    assert "no Call Home Password" in result.stderr
    assert not d.ssh_lines()


# ---- registration -------------------------------------------------------------------


@pytest.mark.parametrize("shell", shells())
def test_register_from_config_file(hub: HubProcess, tmp_path: Path, shell: list[str]) -> None:
    d = Device(tmp_path / "device", hub, shell)
    password_file = tmp_path / "callhome.password"
    password_file.write_text(CALLHOME_PASSWORD + "\n")
    password_file.chmod(0o600)
    conf = tmp_path / "callhome.conf"
    conf.write_text(
        "# written by the test\n"
        "HUB = 127.0.0.1\n"
        f"HUB_PORT='{hub.port}'\n"
        'NODE="site-a"\n'
        f"STATE={d.state}\n"
        f"AUTHORIZED_KEYS={d.authorized_keys}\n"
        f"CALLHOME_PASSWORD_FILE={password_file}\n"
    )
    env_only = {"PATH": f"{d.bin}:{os.environ['PATH']}", "HOME": str(d.home)}
    mgmt = hub.cli("mgmt-key").stdout.decode()

    for _ in range(2):
        result = subprocess.run([*shell, str(SCRIPT), "-c", str(conf), "-r"], env=env_only,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stderr
        assert "registered as 'site-a'" in result.stderr

    assert nodes(hub)["site-a"]["state"] == "pending"
    assert len(nodes(hub)) == 1
    assert d.authorized_keys.read_text() == mgmt
    assert d.authorized_keys.stat().st_mode & 0o777 == 0o600
    assert d.authorized_keys.parent.stat().st_mode & 0o777 == 0o700
    key = d.state / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert d.state.stat().st_mode & 0o777 == 0o700
    assert (d.state / "registered").exists()
    assert (d.state / "known_hosts").read_text().startswith(f"[127.0.0.1]:{hub.port} ")
    # The hub recorded the key the device generated.
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    assert nodes(hub)["site-a"]["fingerprint"] == fingerprint

    lines = d.ssh_lines()
    assert len(lines) == 2 and all(" register site-a" in line for line in lines)
    assert not any(CALLHOME_PASSWORD in line for line in lines)
    assert not list(d.state.glob("askpass.*")), "the askpass helper was left behind"


def test_register_keeps_existing_authorized_keys(device: Device, hub: HubProcess) -> None:
    device.authorized_keys.parent.mkdir(mode=0o700)
    device.authorized_keys.write_text("ssh-ed25519 AAAAexisting admin@laptop")  # no newline
    result = device.run("-r", NODE="site-c", CALLHOME_PASSWORD=CALLHOME_PASSWORD)
    assert result.returncode == 0, result.stderr
    mgmt = hub.cli("mgmt-key").stdout.decode()
    assert device.authorized_keys.read_text() == "ssh-ed25519 AAAAexisting admin@laptop\n" + mgmt
    assert not any(CALLHOME_PASSWORD in line for line in device.ssh_lines())


def test_name_taken_is_reported_once_and_not_retried(hub: HubProcess, tmp_path: Path) -> None:
    first = Device(tmp_path / "first", hub)
    assert first.run("-r", NODE="site-b", CALLHOME_PASSWORD=CALLHOME_PASSWORD).returncode == 0

    second = Device(tmp_path / "second", hub)
    # Not -r: the keep-up mode must give up on a refusal instead of looping
    # (subprocess.run's timeout is the deadline).
    result = second.run(NODE="site-b", CALLHOME_PASSWORD=CALLHOME_PASSWORD, timeout=20)
    assert result.returncode == 1
    assert TAKEN in result.stderr
    assert len(second.ssh_lines()) == 1
    assert not second.authorized_keys.exists()
    assert not (second.state / "registered").exists()
    assert list(nodes(hub)) == ["site-b"]


def test_wrong_password_is_not_retried(device: Device, hub: HubProcess) -> None:
    result = device.run(NODE="site-d", CALLHOME_PASSWORD="not-the-password", timeout=20)
    assert result.returncode == 1
    assert "Permission denied" in result.stderr
    assert len(device.ssh_lines()) == 1
    assert nodes(hub) == {}


# ---- the keep-up loop ----------------------------------------------------------------


@pytest.mark.parametrize("shell", shells())
def test_keeps_the_tunnel_up_across_hub_restarts(hub: HubProcess, tmp_path: Path,
                                                 shell: list[str]) -> None:
    device = Device(tmp_path / "device", hub, shell)
    try:
        keep_up_across_restart(device, hub)
    finally:
        device.stop()


def keep_up_across_restart(device: Device, hub: HubProcess) -> None:
    device.start(NODE="site-e", CALLHOME_PASSWORD=CALLHOME_PASSWORD, FORWARDS="", NSCA="no")
    wait_for(lambda: nodes(hub).get("site-e", {}).get("online"), 20, "site-e online")
    assert device.proc is not None and device.proc.poll() is None
    assert nodes(hub)["site-e"]["state"] == "pending"
    tunnel = device.ssh_lines()[-1]
    for option in ("-N", "ExitOnForwardFailure=yes", "ServerAliveInterval=15",
                   "ServerAliveCountMax=3", "BatchMode=yes", "IdentitiesOnly=yes"):
        assert option in tunnel.split(" ") or f"-o {option}" in tunnel, option
    assert "-R" not in tunnel.split(" ") and "-L" not in tunnel.split(" ")

    port = hub.port
    hub.stop()
    wait_for(lambda: "ssh exited with status" in device.log(), 20, "the script to notice")
    hub.start(f"tcp:{port}:interface=127.0.0.1")
    wait_for(lambda: nodes(hub).get("site-e", {}).get("online"), 20,
             "site-e back online after the hub restart")
    assert "reconnecting in" in device.log()
    assert hub.log_text().count("node site-e online from") >= 2
    assert len(device.ssh_lines()) >= 3    # register, first tunnel, tunnel after restart
    assert not any(CALLHOME_PASSWORD in line for line in device.ssh_lines())

    pids = device.ssh_pids()
    device.proc.send_signal(signal.SIGTERM)
    assert device.proc.wait(timeout=10) == 0
    assert "stopping" in device.log()
    assert not [pid for pid in pids if alive(pid)], "an ssh child outlived the script"
    assert not (device.state / "callhome.pid").exists()
    wait_for(lambda: not nodes(hub)["site-e"]["online"], 10, "site-e offline")


def test_registration_waits_for_the_hub(device: Device, hub: HubProcess) -> None:
    # A device that boots before its network (or the hub) is up keeps trying to register.
    port = hub.port
    hub.stop()
    device.start(NODE="site-w", CALLHOME_PASSWORD=CALLHOME_PASSWORD, FORWARDS="", NSCA="no")
    wait_for(lambda: device.log().count("retrying the registration") >= 2, 20,
             "two failed registration attempts")
    hub.start(f"tcp:{port}:interface=127.0.0.1")
    wait_for(lambda: nodes(hub).get("site-w", {}).get("online"), 20, "site-w online")
    assert "registered as 'site-w'" in device.log()


def test_sigterm_during_backoff(device: Device, hub: HubProcess) -> None:
    # Registered, then the hub goes away: the script sits in its back-off sleeps.
    assert device.run("-r", NODE="site-f", CALLHOME_PASSWORD=CALLHOME_PASSWORD).returncode == 0
    hub.stop()
    device.start(NODE="site-f", FORWARDS="", NSCA="no", BACKOFF_MAX="60")
    wait_for(lambda: device.log().count("reconnecting in") >= 2, 20, "two failed attempts")
    assert device.proc is not None
    device.proc.send_signal(signal.SIGTERM)
    assert device.proc.wait(timeout=10) == 0


def test_pinned_hub_host_key(device: Device, hub: HubProcess) -> None:
    other = make_key(device.root / "not-the-hub")
    wrong = device.run("-r", NODE="site-p", CALLHOME_PASSWORD=CALLHOME_PASSWORD,
                       HUB_HOST_KEY=Path(f"{other}.pub").read_text().strip())
    assert wrong.returncode == 1
    assert "Host key verification failed" in wrong.stderr
    assert len(device.ssh_lines()) == 1 and nodes(hub) == {}

    pin = (hub.data / "keys" / "ssh_host_ed25519_key.pub").read_text().strip()
    right = device.run("-r", NODE="site-p", CALLHOME_PASSWORD=CALLHOME_PASSWORD, HUB_HOST_KEY=pin)
    assert right.returncode == 0, right.stderr
    kind, blob = pin.split()[:2]
    known = (device.state / "known_hosts").read_text()
    assert known == f"[127.0.0.1]:{hub.port} {kind} {blob}\n"
    assert "StrictHostKeyChecking=yes" in device.ssh_lines()[-1]


def test_one_connection_mode_returns_ssh_status_and_syslog(device: Device, hub: HubProcess
                                                           ) -> None:
    assert device.run("-r", NODE="site-g", CALLHOME_PASSWORD=CALLHOME_PASSWORD).returncode == 0
    hub.cli("revoke", "site-g")
    result = device.run("-1", NODE="site-g", FORWARDS="", NSCA="no", timeout=30)
    assert result.returncode == 255
    assert "Permission denied" in result.stderr

    # -s: the script logs through logger and ssh through syslog (-y).
    logged = device.root / "logger.log"
    logger = device.bin / "logger"
    logger.write_text(f'#!/bin/sh\nprintf \'%s\\n\' "$*" >> {logged}\n')
    logger.chmod(0o755)
    quiet = device.run("-s", "-1", NODE="site-g", FORWARDS="", NSCA="no", timeout=30)
    assert quiet.returncode == 255
    assert "callhome" not in quiet.stderr
    assert "-t callhome -p daemon.notice connecting to cms@127.0.0.1" in logged.read_text()
    assert "ssh exited with status 255" in logged.read_text()
    assert " -y " in device.ssh_lines()[-1]


def test_second_instance_refused(device: Device, hub: HubProcess) -> None:
    device.start(NODE="site-h", CALLHOME_PASSWORD=CALLHOME_PASSWORD, FORWARDS="", NSCA="no")
    wait_for(lambda: nodes(hub).get("site-h", {}).get("online"), 20, "site-h online")
    again = device.run(NODE="site-h", FORWARDS="", NSCA="no", timeout=20)
    assert again.returncode == 2 and "already running" in again.stderr


def test_default_forwards_reach_the_hub(device: Device, hub: HubProcess) -> None:
    device.start(NODE="site-t", CALLHOME_PASSWORD=CALLHOME_PASSWORD,
                 NSCA_LOCAL_PORT=str(free_port()))
    wait_for(lambda: "ssh" in nodes(hub).get("site-t", {}).get("forwards", {}), 15,
             "site-t's ssh forward")
    assert nodes(hub)["site-t"]["online"]
