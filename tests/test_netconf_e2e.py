"""NETCONF call home (RFC 8071) with a real OpenSSH `sshd -i` playing the device.

The test opens the TCP connection to the hub's `--netconf` port itself (as the
device would), optionally writes the Junos outbound-ssh preamble, and runs
`sshd -i` with that socket as its stdin and stdout. The device's `netconf`
subsystem is a small script answering `<hello>` and `<rpc>` with `]]>]]>` framing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import define
from helpers import LISTEN_RE, SSH, SSHD, HubProcess, SSHClient, make_key, wait_for

pytestmark = pytest.mark.e2e

SECRET = "s3cret-router2"
HELLO = (b'<?xml version="1.0" encoding="UTF-8"?>\n<hello xmlns="urn:ietf:params:xml:ns:'
         b'netconf:base:1.0"><capabilities><capability>urn:ietf:params:netconf:base:1.0'
         b"</capability></capabilities><session-id>7</session-id></hello>]]>]]>")
SERVER = f"""#!{sys.executable}
import os, re, sys
out = sys.stdout.buffer
out.write({HELLO!r})
out.flush()
buf = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    buf += chunk
    while b"]]>]]>" in buf:
        msg, buf = buf.split(b"]]>]]>", 1)
        if b"<hello" in msg:
            continue
        mid = re.search(rb'message-id="([^"]*)"', msg).group(1)
        body = msg[msg.index(b">", msg.index(b"<rpc")) + 1:msg.rindex(b"</rpc>")]
        out.write(b'<rpc-reply message-id="' + mid + b'"><data>' + body
                  + b"</data></rpc-reply>]]>]]>")
        out.flush()
        if b"<close-session/>" in msg:
            sys.exit(0)
"""
CLIENT_HELLO = (b'<hello xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"><capabilities>'
                b"<capability>urn:ietf:params:netconf:base:1.0</capability></capabilities>"
                b"</hello>]]>]]>")


def rpc(mid: int, body: bytes) -> bytes:
    return b'<rpc message-id="%d">%s</rpc>]]>]]>' % (mid, body)


def reply(mid: int, body: bytes) -> bytes:
    return b'<rpc-reply message-id="%d"><data>%s</data></rpc-reply>]]>]]>' % (mid, body)


def junos_preamble(device: str, host_key: str | None = None, secret: str | None = None
                   ) -> bytes:
    lines = ["MSG-ID: DEVICE-CONN-INFO", "MSG-VER: V1", f"DEVICE-ID: {device}"]
    if host_key is not None and secret is not None:
        mac = hmac.new(secret.encode(), host_key.encode(), hashlib.sha1).hexdigest()
        lines += [f"HOST-KEY: {host_key}", f"HMAC: {mac}"]
    return "".join(f"{line}\r\n" for line in lines).encode()


class NetconfDevice:
    """One device identity (host key) whose `sshd -i` can call home any number of times."""

    def __init__(self, workdir: Path, authorized: Path) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host_key = make_key(workdir / "ssh_host_ed25519_key", "device-host")
        self.host_key_text = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        self.fingerprint = subprocess.run(
            ["ssh-keygen", "-lf", f"{self.host_key}.pub"], capture_output=True, check=True,
            text=True).stdout.split()[1]
        server = workdir / "netconf-server"
        server.write_text(SERVER)
        server.chmod(0o755)
        auth = workdir / "authorized_keys"
        auth.write_text(authorized.read_text())
        self.config = workdir / "sshd_config"
        self.config.write_text(
            f"HostKey {self.host_key}\nAuthorizedKeysFile {auth}\nPidFile none\n"
            f"SetEnv HOME={workdir}\n"  # not root's dotfiles (tests/helpers.py DeviceSSHD)
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
            f"Subsystem netconf {server}\n"
            # The device's keepalives, which the hub must answer (OpenSSH 9.2 sends
            # none while the hub's own keep the connection busy).
            "ClientAliveInterval 1\nClientAliveCountMax 3\nLogLevel VERBOSE\n")
        self.calls = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    def call_home(self, port: int, preamble: bytes = b"") -> tuple[subprocess.Popen[bytes], Path]:
        self.calls += 1
        log = self.dir / f"sshd-{self.calls}.log"
        with socket.create_connection(("127.0.0.1", port)) as sock, open(log, "wb") as err:
            if preamble:
                sock.sendall(preamble)
            proc = subprocess.Popen([SSHD or "sshd", "-i", "-e", "-f", str(self.config)],
                                    stdin=sock.fileno(), stdout=sock.fileno(), stderr=err)
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@define
class Site:
    hub: HubProcess
    netconf_port: int
    operator: SSHClient
    alice: Path
    mgmt: Path
    tmp: Path
    devices: list[NetconfDevice]

    def device(self, name: str) -> NetconfDevice:
        device = NetconfDevice(self.tmp / name, self.mgmt)
        self.devices.append(device)
        return device

    def nodes(self) -> dict[str, dict]:
        return {n["name"]: n for n in json.loads(self.hub.cli("nodes", "--json").stdout)}

    def netconf(self, node: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return self.operator.run(f"alice:{node}@127.0.0.1", "netconf", key=self.alice,
                                 stdin=stdin, options=["-s"])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    if SSH is None or SSHD is None:
        pytest.skip("OpenSSH ssh and sshd are needed")
    if os.geteuid() != 0:
        pytest.skip("sshd -i as the device needs root")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    # Debug level: the keepalive answers are visible only there.
    hub = HubProcess(tmp_path / "hub", "--keepalive", "2", "--keepalive-count", "2",
                     "--netconf", "tcp:0:interface=127.0.0.1", "--log-level", "debug")
    hub.data.mkdir(parents=True)
    # Unknown devices enrol only when allowed: router1 (no HMAC) and the devices
    # without a preamble by name; router2 by its verified HMAC.
    (hub.data / "callhomehub.toml").write_text(
        '[netconf]\nallow = ["router1", "netconf-*"]\n'
        f'[netconf.secrets]\n"router2" = "{SECRET}"\n"router9" = "other-secret"\n')
    hub.start()
    found = wait_for(lambda: dict((w, int(p)) for w, _h, p in LISTEN_RE.findall(
        hub.log_text())).get("NETCONF"), 10, "the NETCONF listener")
    alice = make_key(tmp_path / "alice", "alice")
    hub.cli("user", "add", "alice", "--key", f"{alice}.pub", "--allow", "router*")
    mgmt = hub.data / "keys" / "hub_mgmt_ed25519_key.pub"
    s = Site(hub, int(found), SSHClient(tmp_path / "operator", hub.port),  # type: ignore[arg-type]
             alice, mgmt, tmp_path, [])
    yield s
    for device in s.devices:
        device.stop()
    hub.stop()


def enroll(site: Site, device: NetconfDevice, name: str, preamble: bytes = b""
           ) -> subprocess.Popen[bytes]:
    """First call home (recorded as pending, closed), approve, call home again: online."""
    first, _ = device.call_home(site.netconf_port, preamble)
    assert first.wait(15) is not None
    node = site.nodes()[name]
    assert (node["kind"], node["state"], node["online"]) == ("netconf", "pending", False)
    assert node["fingerprint"] == device.fingerprint
    approved = site.hub.cli("approve", name)
    assert f"host key {device.fingerprint} pinned".encode() in approved.stdout
    proc, _ = device.call_home(site.netconf_port, preamble)
    wait_for(lambda: site.nodes()[name]["online"], 15, f"{name} online")
    return proc


def test_call_home_approve_and_operators_get_the_netconf_subsystem(site: Site) -> None:
    router1 = site.device("router1")
    session = enroll(site, router1, "router1", junos_preamble("router1"))
    table = site.hub.cli("nodes").stdout.decode()
    assert "KIND" in table and "netconf" in table

    big = b"<x>" + b"0123456789abcdef" * 20000 + b"</x>"  # beyond one channel window
    request = CLIENT_HELLO + rpc(1, b"<get-config/>") + rpc(2, big) + rpc(3, b"<close-session/>")
    result = site.netconf("router1", request)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HELLO + reply(1, b"<get-config/>") + reply(2, big) + reply(
        3, b"<close-session/>")

    # Two operators at once: two channels on the one call-home connection.
    base = site.operator.base(key=site.alice)
    procs = [subprocess.Popen([base[0], "-s", *base[1:], "alice:router1@127.0.0.1", "netconf"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=site.operator.env(None))
             for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.read(len(HELLO)) == HELLO  # both sessions open now
        for i, proc in enumerate(procs):
            out, err = proc.communicate(CLIENT_HELLO + rpc(i, b"<op%d/>" % i)
                                        + rpc(9, b"<close-session/>"), timeout=30)
            assert out == reply(i, b"<op%d/>" % i) + reply(9, b"<close-session/>"), err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert session.poll() is None  # the call-home session stays up
    audit = json.loads(site.hub.cli("audit", "--json").stdout)
    assert [e["detail"].split()[0] for e in audit if e["action"] == "gateway"] == ["netconf"] * 3

    # A shell or a jump to a NETCONF node is refused with the way to reach it.
    shell = site.operator.run("alice:router1@127.0.0.1", "true", key=site.alice)
    assert shell.returncode == 1 and b"is a NETCONF device" in shell.stderr

    # The device calls home again: the old session is closed at once, the new one used.
    again, again_log = router1.call_home(site.netconf_port, junos_preamble("router1"))
    assert session.wait(15) is not None
    assert "called home again" in site.hub.log_text()
    wait_for(lambda: site.nodes()["router1"]["online"], 15, "router1 online again")
    result = site.netconf("router1", CLIENT_HELLO + rpc(4, b"<close-session/>"))
    assert result.stdout == HELLO + reply(4, b"<close-session/>"), result.stderr
    assert "subsystem 'netconf'" in again_log.read_text()

    # A device that is not allowed creates nothing, and is refused before SSH.
    stranger = site.device("stranger")
    refused, _ = stranger.call_home(site.netconf_port, junos_preamble("site-new"))
    assert refused.wait(15) is not None
    assert "site-new" not in site.nodes()
    assert "unknown device site-new is not on the [netconf] allow list" in site.hub.log_text()

    # Another host key claiming router1 is refused and logged; the real session stays.
    imposter = site.device("imposter")
    fake, _ = imposter.call_home(site.netconf_port, junos_preamble("router1"))
    assert fake.wait(15) is not None
    assert "device host key changed" in site.hub.log_text()
    node = site.nodes()["router1"]
    assert node["fingerprint"] == router1.fingerprint and node["online"]
    assert again.poll() is None

    # Revoked through the CLI: the live session is dropped.
    site.hub.cli("revoke", "router1")
    assert again.wait(15) is not None
    wait_for(lambda: not site.nodes()["router1"]["online"], 10, "router1 offline")


def test_preamble_hmac_and_devices_without_preamble(site: Site) -> None:
    # DEVICE-ID with a correct HMAC names the node; a shell there is refused.
    router2 = site.device("router2")
    good = junos_preamble("router2", router2.host_key_text, SECRET)
    session = enroll(site, router2, "router2", good)
    assert "DEVICE-ID router2 (HMAC verified)" in site.hub.log_text()

    # The hub's keepalives (every 2 s, answered by sshd) keep the session up and
    # drop a device that stops answering.
    wait_for(lambda: site.hub.log_text().count(
        "NetconfConnection#debug] global request failure") >= 3, 15, "answered keepalives")
    assert session.poll() is None and site.nodes()["router2"]["online"]
    os.kill(session.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: not site.nodes()["router2"]["online"], 15, "router2 dropped")
        assert "keepalives unanswered" in site.hub.log_text()
    finally:
        os.kill(session.pid, signal.SIGCONT)

    # A wrong HMAC (wrong shared secret) is refused before any SSH.
    router9 = site.device("router9")
    bad, _ = router9.call_home(site.netconf_port,
                               junos_preamble("router9", router9.host_key_text, "guess"))
    assert bad.wait(15) is not None
    assert "router9" not in site.nodes()
    assert "device router9: wrong HMAC" in site.hub.log_text()

    # A correct HMAC for another key than the one the device presents is refused.
    stolen = junos_preamble("router2", router9.host_key_text, SECRET)
    wrong_key, _ = router2.call_home(site.netconf_port, stolen)
    assert wrong_key.wait(15) is not None
    assert "is not the HOST-KEY its preamble vouched for" in site.hub.log_text()

    # Plain RFC 8071 (no preamble): named by its host key fingerprint.
    plain = site.device("plain")
    proc, _ = plain.call_home(site.netconf_port)
    assert proc.wait(15) is not None
    [name] = [n for n in site.nodes() if n.startswith("netconf-")]
    assert site.nodes()[name]["state"] == "pending"
    assert site.nodes()[name]["fingerprint"] == plain.fingerprint
