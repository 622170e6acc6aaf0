"""Session recording with the real peers: `ssh -tt alice:site-a@hub` on a pty against a
real device sshd, then `callhomehub sessions --json` and `callhomehub replay`, byte-exact."""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import time
import tty
from pathlib import Path

import pytest
from helpers import wait_for
from test_gateway_e2e import Site, site  # noqa: F401 (the fixture)

pytestmark = pytest.mark.e2e


class PtyClient:
    """The ssh client on a pty of its own (raw, so the bytes read are those ssh wrote)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)  # no local echo nor newline translation: ssh's output only
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.seen = b""

    def read_until(self, text: bytes | None, timeout: float = 15.0) -> None:
        """Read until `text` was seen (None: until the client has gone)."""
        deadline = time.monotonic() + timeout
        while text is None or text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {text!r}; screen: {self.seen[-300:]!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the client closed the pty
                    chunk = b""
                if not chunk:
                    if text is None:
                        return
                    raise AssertionError(f"EOF before {text!r}; screen: {self.seen[-300:]!r}")
                self.seen += chunk

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def sessions(on: Site) -> list[dict]:
    return json.loads(on.hub.cli("sessions", "--json").stdout)


def test_a_recorded_session_replays_byte_exact(site: Site) -> None:  # noqa: F811
    base = site.operator.base(key=site.alice)
    client = PtyClient([base[0], "-q", "-tt", *base[1:], "alice:site-a@127.0.0.1"],
                       site.operator.env(None))
    try:
        client.read_until(b"# ")  # the device's root prompt
        client.type(b"echo $((6*7))\r")
        client.read_until(b"42")
        # Not UTF-8, a character split anywhere, colour: all must come back as they were.
        client.type(b"printf 'caf\\303\\251 \\377\\376 \\033[31mred\\033[0m\\n'\r")
        client.read_until(b"red")
        client.type(b"stty size; exit 3\r")
        client.read_until(None)
        assert client.proc.wait(15) == 3
    finally:
        client.close()
    received = client.seen
    assert b"caf\xc3\xa9 \xff\xfe \x1b[31mred" in received

    row = wait_for(lambda: [r for r in sessions(site) if r["end"] is not None],
                   what="the session's end in the registry")
    [session] = row  # type: ignore[misc]
    assert (session["node"], session["user"], session["kind"], session["exit"],
            session["source"]) == ("site-a", "alice", "shell", 3, "127.0.0.1")
    assert session["bytes"]["from_device"] == len(received)
    path = Path(session["recording"])
    assert path.parent == site.hub.data / "recordings"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = b"".join(json.loads(line)[2].encode("utf-8", "surrogateescape")
                    for line in path.read_bytes().splitlines()[1:]
                    if json.loads(line)[1] == "i")
    assert keys == b""  # what the operator typed is not recorded

    def replay() -> bytes:
        out = site.hub.cli("replay", str(session["id"]), "--speed", "1000").stdout
        return out if len(out) >= len(received) else b""

    replayed = wait_for(replay, what="the whole recording on disk")
    assert replayed == received
    # The audit keeps its gateway entry as before.
    audit = json.loads(site.hub.cli("audit", "--json").stdout)
    assert [e["detail"].split(" ")[0] for e in audit if e["action"] == "gateway"] == ["shell"]


def test_exec_and_jump_sessions_are_not_recorded(site: Site) -> None:  # noqa: F811
    result = site.operator.run("alice:site-a@127.0.0.1", "echo out; exit 4", key=site.alice)
    assert (result.returncode, result.stdout) == (4, b"out\n")
    # What `ssh -J` runs for its first hop: the device's own SSH, relayed end to end.
    jump = site.operator.run("alice@127.0.0.1", key=site.alice, options=["-W", "site-a:22"])
    assert jump.stdout.startswith(b"SSH-2.0-OpenSSH"), jump.stderr
    [row] = wait_for(lambda: [r for r in sessions(site) if r["end"] is not None],
                     what="the exec session's end")  # type: ignore[misc]
    assert (row["kind"], row["command"], row["exit"], row["recording"]) == (
        "exec", "echo out; exit 4", 4, None)
    assert row["bytes"]["from_device"] == 4
    assert os.listdir(site.hub.data / "recordings") == []
    # The jump is relayed end to end: audited with bytes, no session row, no recording.
    audit = json.loads(site.hub.cli("audit", "--json").stdout)
    assert [e["action"] for e in audit if e["target"] == "site-a"].count("jump") == 1
