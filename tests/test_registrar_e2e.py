"""The registrar user seen by a device running the stock OpenSSH client."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import CALLHOME_PASSWORD
from helpers import HubProcess, SSHClient, make_key, wait_for

pytestmark = pytest.mark.e2e

NO_SHELL = b"User 'cms' does not have shell access on this device\n"
USAGE = (b"cms can only register a device and carry its tunnel:\n"
         b"  ssh cms@HUB register [NAME] < id_ed25519.pub   (once, with the Call Home Password)\n"
         b"  ssh -N -R 0:localhost:22 cms@HUB              (then, with the device's key)\n")


def register(client: SSHClient, key: Path, *name: str, password: str = CALLHOME_PASSWORD):
    return client.run("cms@127.0.0.1", "register", *name, password=password,
                      stdin=Path(f"{key}.pub").read_bytes())


def nodes(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("nodes", "--json").stdout)


def test_register_with_password_then_key_login(hub: HubProcess, client: SSHClient,
                                               tmp_path: Path) -> None:
    key = make_key(tmp_path / "dev", "root@gw-17")
    mgmt = hub.cli("mgmt-key").stdout

    result = register(client, key, "site-a")
    assert result.returncode == 0, result.stderr
    assert result.stdout == mgmt
    assert result.stderr == b"register: node site-a is pending approval on the hub\n"
    assert mgmt.startswith(b"ssh-ed25519 ")
    [node] = nodes(hub)
    assert node["name"] == "site-a"
    assert node["state"] == "pending"
    fp = Path(f"{key}.pub").read_text().split()[1]
    assert node["fingerprint"].startswith("SHA256:") and fp

    again = register(client, key, "site-a")
    assert again.returncode == 0 and again.stdout == mgmt
    assert len(nodes(hub)) == 1

    # From now on the device logs in by key, never asked for a password
    # (BatchMode would fail the login instead of prompting).
    shell = client.run("cms@127.0.0.1", key=key)
    assert shell.returncode == 1
    assert shell.stderr == NO_SHELL
    command = client.run("cms@127.0.0.1", "uname", "-a", key=key)
    assert (command.returncode, command.stderr, command.stdout) == (1, NO_SHELL + USAGE, b"")
    help_ = client.run("cms@127.0.0.1", "help", key=key)
    assert (help_.returncode, help_.stderr, help_.stdout) == (1, NO_SHELL + USAGE, b"")
    pty = client.run("cms@127.0.0.1", key=key, options=["-tt"])
    # Under a terminal the line ends in CR LF, so the next line starts at column 0.
    assert pty.returncode == 1 and NO_SHELL.replace(b"\n", b"\r\n") in pty.stderr


def test_default_name_from_key_comment(hub: HubProcess, client: SSHClient,
                                       tmp_path: Path) -> None:
    key = make_key(tmp_path / "dev", "root@lora-gw-3")
    assert register(client, key).returncode == 0
    assert [n["name"] for n in nodes(hub)] == ["lora-gw-3"]


def test_registration_errors_are_one_clear_line(hub: HubProcess, client: SSHClient,
                                                tmp_path: Path) -> None:
    first, second = make_key(tmp_path / "a", "a"), make_key(tmp_path / "b", "b")
    assert register(client, first, "site-a").returncode == 0

    taken = register(client, second, "SITE-A")
    assert taken.returncode == 1
    assert taken.stderr == b"register: node name 'SITE-A' is already registered with another key\n"

    garbage = client.run("cms@127.0.0.1", "register", "x", password=CALLHOME_PASSWORD,
                         stdin=b"this is not a key\n")
    assert garbage.returncode == 1
    assert garbage.stderr.startswith(b"register: not an OpenSSH public key")
    assert garbage.stderr.count(b"\n") == 1

    private = client.run("cms@127.0.0.1", "register", "x", password=CALLHOME_PASSWORD,
                         stdin=first.read_bytes())
    assert private.returncode == 1 and b"private key" in private.stderr

    bad_name = register(client, second, "no:colons")
    assert bad_name.returncode == 1 and b"invalid node name" in bad_name.stderr
    assert [n["name"] for n in nodes(hub)] == ["site-a"]


def test_wrong_password_is_refused(hub: HubProcess, client: SSHClient, tmp_path: Path) -> None:
    key = make_key(tmp_path / "dev", "dev")
    result = register(client, key, "site-a", password="wrong")
    assert result.returncode == 255
    assert b"Permission denied" in result.stderr
    assert nodes(hub) == []
    assert "wrong Call Home Password" in hub.log_text()


def test_registrar_may_do_nothing_else(hub: HubProcess, client: SSHClient,
                                       tmp_path: Path) -> None:
    key = make_key(tmp_path / "dev", "dev")
    assert register(client, key, "site-a").returncode == 0
    sub = client.run("cms@127.0.0.1", "sftp", key=key, options=["-s"])
    assert sub.returncode != 0 and b"subsystem request failed" in sub.stderr
    jump = client.run("cms@127.0.0.1", key=key,
                      options=["-o", "LogLevel=INFO", "-W", "127.0.0.1:22"])
    assert jump.returncode != 0
    assert b"administratively prohibited" in jump.stderr
    sock = tmp_path / "agent.sock"
    agent_process = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, "ssh-agent's socket")
        agent = client.run("cms@127.0.0.1", "true", key=key, env={"SSH_AUTH_SOCK": str(sock)},
                           options=["-A", "-X", "-o", "XAuthLocation=/nonexistent"])
    finally:
        agent_process.terminate()
        agent_process.wait(5)
    assert agent.returncode == 1
    wait_for(lambda: "refused session request auth-agent-req@openssh.com" in hub.log_text())
    assert "refused session request x11-req" in hub.log_text()
    # An unregistered key is not let in, and BatchMode means no password prompt.
    stranger = make_key(tmp_path / "stranger", "x")
    refused = client.run("cms@127.0.0.1", key=stranger)
    assert refused.returncode == 255 and b"Permission denied" in refused.stderr


def test_revoke_drops_live_session_and_refuses_key(hub: HubProcess, client: SSHClient,
                                                   tmp_path: Path) -> None:
    key = make_key(tmp_path / "dev", "dev")
    assert register(client, key, "site-a").returncode == 0
    hub.cli("approve", "site-a")
    assert nodes(hub)[0]["state"] == "approved"

    session = client.popen("cms@127.0.0.1", key=key, options=["-N"])
    try:
        wait_for(lambda: nodes(hub)[0]["online"], 10, "the node to be online")
        assert nodes(hub)[0]["peer"] == "127.0.0.1"
        hub.cli("revoke", "site-a")
        # Dropped well within 2 s of the change (the hub polls every 0.25 s).
        wait_for(lambda: session.poll() is not None, 2, "the revoked session to be dropped")
    finally:
        if session.poll() is None:
            session.send_signal(signal.SIGTERM)
        session.wait(5)
    assert not nodes(hub)[0]["online"]
    refused = client.run("cms@127.0.0.1", key=key)
    assert refused.returncode == 255 and b"Permission denied" in refused.stderr

    hub.cli("remove", "site-a")
    assert nodes(hub) == []
    actions = [e["action"] for e in json.loads(hub.cli("audit", "--json").stdout)]
    assert actions[-4:] == ["register", "approve", "revoke", "remove"]
