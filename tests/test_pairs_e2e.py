"""A master/clone pair with the real OpenSSH: two devices, each a real sshd behind its
own `ssh -R` tunnel; the pair's name reaches the master, and the clone once the
master's tunnel is gone (killed, or silent until the hub's keepalives give up)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import define
from conftest import CALLHOME_PASSWORD
from helpers import SSH, DeviceSSHD, HubProcess, SSHClient, make_key, wait_for
from tunnel_helpers import Device

pytestmark = pytest.mark.e2e

KEEPALIVE, KEEPALIVE_COUNT = 1, 2
# The hub drops a silent tunnel after KEEPALIVE x KEEPALIVE_COUNT seconds, give or
# take one interval; the rest is the margin of a loaded 2-core test machine.
BUDGET = KEEPALIVE * (KEEPALIVE_COUNT + 1) + 3


@define
class PairSite:
    hub: HubProcess
    sshds: dict[str, DeviceSSHD]
    devices: dict[str, Device]
    alice: Path
    tmp: Path

    def connect(self, name: str) -> None:
        self.devices[name].connect(f"0:127.0.0.1:{self.sshds[name].port}")

    def gateway(self, login: str, command: str) -> subprocess.CompletedProcess[bytes]:
        return SSHClient(self.tmp / "operator", self.hub.port).run(
            f"{login}@127.0.0.1", command, key=self.alice)

    def marker(self) -> bytes:
        """Which device `alice:pbx` reaches now."""
        result = self.gateway("alice:pbx", "echo $MARKER")
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def pair(self) -> dict:
        [pair] = json.loads(self.hub.cli("pairs", "--json").stdout)
        return pair


@pytest.fixture
def site(tmp_path: Path) -> Iterator[PairSite]:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    hub = HubProcess(tmp_path / "hub", "--keepalive", str(KEEPALIVE),
                     "--keepalive-count", str(KEEPALIVE_COUNT))
    hub.data.mkdir(parents=True)
    hub.cli("callhome-password", stdin=CALLHOME_PASSWORD.encode())
    hub.start()
    alice = make_key(tmp_path / "alice", "alice")
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    sshds, devices = {}, {}
    try:
        for name, marker in (("pbx-a", "device-a"), ("pbx-b", "device-b")):
            sshds[name] = DeviceSSHD(tmp_path / f"sshd-{name}", [mgmt, alice],
                                     f"SetEnv MARKER={marker}\n").start()
            devices[name] = Device(hub, tmp_path, name)
            devices[name].connect(f"0:127.0.0.1:{sshds[name].port}")
            hub.cli("approve", name)
        hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "pbx")
        assert hub.cli("pair", "add", "pbx", "pbx-a", "pbx-b").stdout == (
            b"pair pbx: master pbx-a, clone pbx-b\n")
        site = PairSite(hub, sshds, devices, alice, tmp_path)
        wait_for(lambda: site.pair()["forwards"], 10, "the pair's port")
        yield site
    finally:
        for device in devices.values():
            device.close()
        for sshd in sshds.values():
            sshd.stop()
        hub.stop()


def through_pair_port(site: PairSite, port: int, n: int) -> bytes:
    """`echo $MARKER` over ssh to the pair's own port (a fresh known_hosts each time:
    the two devices have their own host keys)."""
    result = SSHClient(site.tmp / f"direct-{n}", port).run(
        "root@127.0.0.1", "echo $MARKER", key=site.alice)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_pair_reaches_the_clone_once_the_masters_tunnel_is_gone(site: PairSite) -> None:
    assert site.marker() == b"device-a"
    pair = site.pair()
    assert (pair["active"], list(pair["forwards"])) == ("pbx-a", ["ssh"])
    port = pair["forwards"]["ssh"]
    assert through_pair_port(site, port, 1) == b"device-a"
    # Grants on the pair cover its members by their own names.
    assert site.gateway("alice:pbx-b", "echo $MARKER").stdout == b"device-b\n"

    # The master's ssh -R is killed: the clone answers at once, on the same pair port.
    killed = time.monotonic()
    site.devices["pbx-a"].kill(signal.SIGKILL)
    wait_for(lambda: site.marker() == b"device-b", BUDGET, "the clone to answer")
    took = time.monotonic() - killed
    assert took < BUDGET
    assert site.pair()["forwards"] == {"ssh": port}
    assert through_pair_port(site, port, 2) == b"device-b"

    # The master calls back: the pair is the master's again.
    site.connect("pbx-a")
    wait_for(lambda: site.marker() == b"device-a", 10, "the master to answer again")
    assert through_pair_port(site, port, 3) == b"device-a"

    # A master gone silent (stopped, its TCP connection left open) is given up after
    # the hub's keepalive budget; then the clone answers.
    stopped = time.monotonic()
    site.devices["pbx-a"].kill(signal.SIGSTOP)
    wait_for(lambda: site.pair()["active"] == "pbx-b", BUDGET, "the switch to the clone")
    silent = time.monotonic() - stopped
    assert site.marker() == b"device-b"
    assert silent < BUDGET
    switches = [e["detail"] for e in json.loads(site.hub.cli("audit", "--json").stdout)
                if e["action"] == "pair-switch"]
    assert switches == ["from none to pbx-a", "from pbx-a to pbx-b", "from pbx-b to pbx-a",
                        "from pbx-a to pbx-b"]
    print(f"clone reached {took:.2f} s after SIGKILL, {silent:.2f} s after SIGSTOP "
          f"(keepalive {KEEPALIVE} s x {KEEPALIVE_COUNT})")


def test_jump_host_and_forwards_to_the_pair_name(site: PairSite) -> None:
    known = site.tmp / "device_known_hosts"
    known.write_text("".join(f"pbx {Path(f'{s.host_key}.pub').read_text()}"
                             for s in site.sshds.values()))
    config = site.tmp / "ssh_config"
    config.write_text(
        f"Host 127.0.0.1\n  UserKnownHostsFile {site.tmp / 'hub_known_hosts'}\n"
        "  StrictHostKeyChecking accept-new\n"
        f"Host pbx\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
        f"Host *\n  BatchMode yes\n  IdentitiesOnly yes\n  IdentityFile {site.alice}\n")

    def jump() -> bytes:
        result = subprocess.run(
            ["ssh", "-F", str(config), "-J", f"alice@127.0.0.1:{site.hub.port}", "root@pbx",
             "echo $MARKER"], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert jump() == b"device-a"
    site.devices["pbx-a"].kill(signal.SIGKILL)
    wait_for(lambda: site.pair()["active"] == "pbx-b", BUDGET, "the switch to the clone")
    assert jump() == b"device-b"
    # Nodes show their pair.
    nodes = json.loads(site.hub.cli("nodes", "--json").stdout)
    assert [n["pair"] for n in nodes] == [{"name": "pbx", "role": "master"},
                                          {"name": "pbx", "role": "clone"}]
    # A device may not register under the pair's name.
    client = SSHClient(site.tmp / "newdev", site.hub.port)
    key = make_key(site.tmp / "newdev-key", "pbx")
    result = client.run("cms@127.0.0.1", "register", "pbx", password=CALLHOME_PASSWORD,
                        stdin=Path(f"{key}.pub").read_bytes())
    assert result.returncode != 0
    assert b"node name 'pbx' is the name of a master/clone pair" in result.stderr + result.stdout
