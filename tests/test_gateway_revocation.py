"""Changing or deleting an operator ends or narrows their live connections (in memory).

The admin CLI writes the registry from another process; the hub's poll
(`Hub.sync`) then re-checks each live operator connection.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from memory_gateway import OperatorChannel, Site, exec_, shell
from memory_hub import new_key
from twisted.conch.ssh import channel, common

from hub.rules.chooser import PROMPT
from hub.store.registry import Registry


class JumpChannel(channel.SSHChannel):
    """An operator's `direct-tcpip` channel (`ssh -W node:22`): records what comes back."""

    name = b"direct-tcpip"

    def __init__(self) -> None:
        channel.SSHChannel.__init__(self)
        self.out = b""
        self.is_open = False
        self.is_closed = False
        self.refused: str | None = None

    def channelOpen(self, specificData: bytes) -> None:
        self.is_open = True

    def openFailed(self, reason: Any) -> None:
        self.refused = str(reason)

    def dataReceived(self, data: bytes) -> None:
        self.out += data

    def closed(self) -> None:
        self.is_closed = True
        self.loseConnection()


def jump(site: Site, via: OperatorChannel, node: bytes) -> JumpChannel:
    chan = JumpChannel()
    via.conn.openChannel(chan, common.NS(node) + struct.pack(">L", 22)
                         + common.NS(b"127.0.0.1") + struct.pack(">L", 50000))
    site.settle()
    return chan


def cli(site: Site) -> Registry:
    """The admin CLI's view: a second Registry object on the same file."""
    return Registry(site.hub.config.db_path, now=lambda: 0.0)


def disconnects(via: OperatorChannel) -> list[tuple[int, bytes]]:
    """Record the DISCONNECT the operator's client receives."""
    got: list[tuple[int, bytes]] = []
    via.conn.transport.receiveError = lambda code, text: got.append((code, text))
    return got


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    site.call_home(site.enroll("lab-1", site.sshd), site.sshd)
    return site


def test_deleting_an_operator_ends_their_sessions_and_jumps(site: Site) -> None:
    session = site.operator(b"alice:site-a", exec_(b"cat"))
    assert session.replies == [True] and not session.is_closed
    tunnel = jump(site, session, b"site-a")
    assert tunnel.is_open and tunnel.out.startswith(b"SSH-2.0-")
    got = disconnects(session)
    assert len(site.hub.operators) == 1

    cli(site).del_user("alice", "cli:test")
    site.hub.sync()
    site.settle()
    assert got == [(11, b"operator alice was deleted on the hub")]
    assert session.is_closed and tunnel.is_closed
    assert len(site.hub.operators) == 0
    # The device end of the session is gone too.
    assert all(device.closing for device in site.sshd.sessions)


def test_a_replaced_operator_reaches_nothing_of_the_new_grants(site: Site) -> None:
    session = site.operator(b"alice", shell())
    assert session.out.endswith(PROMPT)
    got = disconnects(session)
    admin = cli(site)
    admin.del_user("alice", "cli:test")
    admin.add_user("alice", None, [(site.alice.public().blob(), "fp")], ["lab-*"], "cli:test")
    # Before the poll notices, the old connection is refused the new grant's nodes ...
    refused = jump(site, session, b"lab-1")
    assert refused.refused is not None and not refused.is_open
    # ... and the old grant's too: the login no longer stands.
    site.type(session, b"site-a\r")
    assert session.err == b"callhomehub: node 'site-a' does not exist or you may not reach it\r\n"
    # ... and the poll ends it.
    site.hub.sync()
    site.settle()
    assert got == [(11, b"operator alice was replaced on the hub")]
    # The new alice reaches her nodes.
    fresh = site.operator(b"alice:lab-1", exec_(b"echo"))
    assert (fresh.out, fresh.status) == (b"ran echo as root\n", 0)


def test_narrowed_grants_close_what_is_no_longer_granted(site: Site) -> None:
    site.hub.registry.set_user("alice", "test", allow=["site-*", "lab-*"])
    direct = site.operator(b"alice:lab-1", exec_(b"cat"))
    chooser = site.operator(b"alice", shell())
    site.type(chooser, b"lab-1\r")
    assert chooser.out.endswith(b"root# ")
    kept = jump(site, direct, b"site-a")
    lost = jump(site, direct, b"lab-1")
    assert kept.is_open and lost.is_open
    got = disconnects(direct)

    cli(site).set_user("alice", "cli:test", allow=["site-*"])
    site.hub.sync()
    site.settle()
    # The connections stay; what reached lab-1 is closed, with a word on stderr.
    assert got == []
    assert (direct.err, direct.status, direct.is_closed) == (
        b"callhomehub: access to node lab-1 was withdrawn\r\n", 1, True)
    assert chooser.err == b"callhomehub: access to node lab-1 was withdrawn\r\n"
    assert chooser.out.endswith(b"1: site-a (online)\r\nq: quit\r\n" + PROMPT)
    assert not chooser.is_closed
    assert lost.is_closed and not kept.is_closed
    # New ones are refused; the rest of the grant still works.
    assert jump(site, chooser, b"lab-1").refused
    site.type(chooser, b"site-a\r")
    assert chooser.out.endswith(b"root# ")


def test_a_removed_key_or_changed_password_ends_the_login(site: Site) -> None:
    session = site.operator(b"alice:site-a", exec_(b"cat"))
    got = disconnects(session)
    other = new_key()
    admin = cli(site)
    admin.set_user("alice", "cli:test", allow=["*"])  # widened: nothing to end
    site.hub.sync()
    site.settle()
    assert got == [] and not session.is_closed
    admin.set_user("alice", "cli:test", keys=[(other.public().blob(), "fp2")])
    site.hub.sync()
    site.settle()
    assert got == [(11, b"the key operator alice logged in with was removed on the hub")]



def test_a_connection_that_ends_leaves_the_roll(site: Site) -> None:
    session = site.operator(b"alice:site-a", exec_(b"echo"))
    assert session.status == 0 and len(site.hub.operators) == 1
    session.conn.transport.loseConnection()
    site.settle()
    assert len(site.hub.operators) == 0
