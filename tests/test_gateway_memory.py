"""The console gateway end to end in memory: operator <-> hub <-> device tunnel <-> device sshd.

No root, no real sshd: the device's sshd is a Conch server reached through the
device's call-home tunnel, as the hub reaches a real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from memory_gateway import DeviceSSHD, OperatorChannel, Site, audit, exec_, shell
from memory_hub import ClientTransport, new_key
from twisted.logger import formatEvent, globalLogPublisher

from hub.access.session import EARLY_WINDOW
from hub.rules.chooser import PROMPT


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_exec_passes_output_stderr_and_exit_status(site: Site) -> None:
    chan = site.operator(b"alice:site-a", exec_(b"hello"))
    assert (chan.out, chan.err, chan.status) == (b"hello from root\n", b"err\n", 3)
    assert chan.eof and chan.is_closed and chan.replies == [True]
    assert site.sshd.logins == [b"root"]
    # Node names are case-insensitive.
    upper = site.operator(b"alice:SITE-A", exec_(b"echo"))
    assert (upper.out, upper.status) == (b"ran echo as root\n", 0)
    [(_, target, detail), _] = audit(site.hub)
    assert target == "site-a" and detail.startswith("exec start ")
    assert detail.endswith(" bytes to-device 0 from-device 20")


def test_chooser_lists_chooses_returns_and_quits(site: Site) -> None:
    site.enroll("site-b", site.sshd)  # approved, never called home
    chan = site.operator(b"alice", shell())
    assert chan.out == (b"1: site-a (online)\r\n2: site-b (offline)\r\nq: quit\r\n" + PROMPT)
    site.type(chan, b"nosuch\r")
    assert chan.out.endswith(b"nosuch\r\nNo such node: nosuch\r\n" + PROMPT)
    chan.out = b""
    site.type(chan, b"1\r")
    assert chan.out == b"1\r\nroot# "
    [device] = site.sshd.sessions
    assert device.pty is not None and device.command == b"shell"
    site.type(chan, b"id\r")
    assert chan.out.endswith(b"id\r\nran id\r\nroot# ")
    chan.out = b""
    site.type(chan, b"exit\r")
    assert chan.out == b"\r\nConnection to site-a closed.\r\n" + (
        b"1: site-a (online)\r\n2: site-b (offline)\r\nq: quit\r\n" + PROMPT)
    assert chan.status is None and not chan.is_closed
    site.type(chan, b"site-b\r")
    assert chan.err == b"callhomehub: node site-b is offline\r\n"
    assert chan.out.endswith(b"site-b\r\n1: site-a (online)\r\n2: site-b (offline)\r\n"
                             b"q: quit\r\n" + PROMPT)
    site.type(chan, b"q\r")
    assert chan.status == 0 and chan.is_closed
    assert [detail.split()[0] for _, _, detail in audit(site.hub)] == ["shell"]


def test_chooser_without_nodes_and_a_shell_without_a_terminal(site: Site) -> None:
    site.hub.registry.add_user("carol", None, [(site.alice.public().blob(), "fp2")],
                               ["lab-*"], "test")
    chan = site.operator(b"carol", shell(), key=site.alice)
    assert chan.out == b"No nodes are available to you.\r\nq: quit\r\n" + PROMPT
    site.type(chan, b"\x04")
    assert chan.status == 0 and chan.is_closed
    plain = site.operator(b"alice", shell(pty=False))
    assert plain.err == (b"callhomehub: no node selected: use ssh alice:NODE@hub, "
                         b"or a terminal for the chooser\r\n")
    assert plain.status == 1 and plain.is_closed


def refused(site: Site, login: bytes, message: bytes, command: bytes = b"hello") -> None:
    chan = site.operator(login, exec_(command))
    assert chan.err == b"callhomehub: " + message + b"\r\n"
    assert (chan.out, chan.status, chan.is_closed) == (b"", 1, True)


def test_refusals_never_contact_the_device(site: Site) -> None:
    site.hub.registry.add_user("bob", None, [(site.alice.public().blob(), "fp2")],
                               ["lab-*"], "test")
    refused(site, b"bob:site-a", b"node 'site-a' does not exist or you may not reach it")
    refused(site, b"alice:nosuch", b"node 'nosuch' does not exist or you may not reach it")
    site.hub.registry.register("site-p", new_key().public().blob(), "fp", "test")
    refused(site, b"alice:site-p", b"node site-p is pending, not approved")
    site.enroll("site-b", site.sshd)
    refused(site, b"alice:site-b", b"node site-b is offline")
    unpinned = site.enroll("site-u", site.sshd, pin=False)
    site.call_home(unpinned, site.sshd, peer="192.0.2.21")
    refused(site, b"alice:site-u",
            b"node site-u is not enrolled: run callhomehub approve or enroll")
    site.hub.registry.register_netconf("site-r1", new_key().public().blob(), "fp", "test")
    site.hub.registry.set_state("site-r1", "approved", "test")
    refused(site, b"alice:site-r1", b"node site-r1 is a NETCONF device: only its netconf "
                                    b"subsystem is offered (ssh -s alice:site-r1@hub netconf)")
    assert site.sshd.logins == []


def test_device_refusing_the_login_the_host_key_or_the_request(site: Site) -> None:
    stranger = DeviceSSHD(site.clock, new_key())  # has not authorized the hub's key
    site.call_home(site.enroll("site-x", stranger), stranger, peer="192.0.2.22")
    refused(site, b"alice:site-x",
            b"cannot log in to site-x: the device refused the hub's management key for root")
    impostor = DeviceSSHD(site.clock, site.hub.keys.mgmt)  # another host key
    key = site.enroll("site-y", site.sshd)
    site.call_home(key, impostor, peer="192.0.2.23")
    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        chan = site.operator(b"alice:site-y", exec_(b"hello"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert chan.err.startswith(b"callhomehub: cannot log in to site-y: device host key "
                               b"changed: pinned ") and chan.status == 1
    # What the hub sent the device, and logged: words, no Failure repr, no traceback.
    lines = [formatEvent(e) or "" for e in events]
    assert "node site-y: disconnecting: bad host key (host key not verifiable)" in lines
    assert not [line for line in lines if "Failure instance" in line or "Address(" in line]
    site.sshd.refuse_channels = True
    chan = site.operator(b"alice:site-a", exec_(b"hello"))
    assert chan.err == (b"callhomehub: cannot log in to site-a: the device's SSH service "
                        b"behind its forward *:0 refused the connection: connect failed "
                        b"(code 2, connect failed)\r\n") and chan.status == 1
    site.sshd.refuse_channels = False
    refused(site, b"alice:site-a", b"the device refused the exec request", b"refuse")


def test_early_input_and_eof_arrive_in_order(site: Site) -> None:
    typed = b"".join(b"line %d\n" % i for i in range(500))
    chan = site.operator(b"alice:site-a", exec_(b"cat"), stdin=typed, eof=True)
    assert (chan.out, chan.status, chan.eof) == (typed, 0, True)
    assert site.sshd.sessions[-1].received == typed


def test_input_flooded_before_the_device_session_is_held_to_the_early_window(
        site: Site) -> None:
    client = ClientTransport(b"alice:site-a", site.alice, None)
    site._connect(client, "192.0.2.10")
    typed = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # twice the relay's window
    chan = OperatorChannel(exec_(b"cat"), typed)
    client.service.openChannel(chan)
    # Only the operator's connection moves: the device's login through its tunnel
    # does not answer yet, so the hub holds whatever the operator sends.
    operator, tunnel = site.pumps[-1], site.pumps[0]
    assert tunnel is not operator
    for _ in range(200):
        operator.pump()
        site.clock.advance(0)
    held = len(typed) - len(chan.buf)
    assert 0 < held <= EARLY_WINDOW
    # Once the device session is up, all of it reaches the device, in order.
    site.settle()
    assert site.sshd.sessions[-1].received == typed
    assert chan.out == typed


def test_operator_eof_after_the_session_is_up(site: Site) -> None:
    chan = site.operator(b"alice:site-a", exec_(b"cat"))
    site.type(chan, b"abc")
    assert chan.out == b"abc" and chan.status is None
    chan.conn.sendEOF(chan)
    site.settle()
    assert (chan.out, chan.status, chan.is_closed) == (b"abc", 0, True)


def test_serial_port_login_and_console_template(site: Site) -> None:
    chan = site.operator(b"alice:site-a:port02", exec_(b"stty"))
    assert (chan.out, chan.status) == (b"ran stty as root:port02\n", 0)
    site.hub.registry.set_device_access("site-a", "test", console="console {port}")
    chan = site.operator(b"alice:site-a:port02", shell())
    assert (chan.out, chan.status) == (b"ran console port02 as root\n", 0)
    assert site.sshd.logins == [b"root:port02", b"root"]
    assert [d.split()[:2] for _, _, d in audit(site.hub)] == [["console", "port02"]] * 2


@pytest.mark.parametrize("size", [4 * 1024 * 1024])
def test_bulk_transfers_both_ways_arrive_whole(site: Site, size: int) -> None:
    chan = site.operator(b"alice:site-a", exec_(b"bulk %d" % size))
    assert chan.status == 0 and chan.out == bytes(range(256)) * (size // 256)
    upload = bytes(range(256)) * (size // 256 // 2)
    chan = site.operator(b"alice:site-a", exec_(b"cat"))
    chan.write(upload)
    chan.conn.sendEOF(chan)
    site.settle()
    assert chan.status == 0 and len(chan.out) == len(upload) and chan.out == upload
