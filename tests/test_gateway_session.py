"""The gateway session's state machine: inputs in, outputs and states out, no reactor."""

from __future__ import annotations

import struct

import pytest

from hub.rules.chooser import PROMPT, Entry
from hub.rules.routes import Route
from hub.rules.session import (
    MOVES,
    Close,
    Count,
    DeviceEOF,
    DeviceRequest,
    Dial,
    DropDevice,
    Exit,
    IllegalMove,
    OfferMenu,
    OperatorEOF,
    Record,
    Relay,
    SessionMachine,
    StartSoon,
    State,
    Stderr,
    ToDevice,
    Write,
)

S = State
ROUTE = Route("site-a", "root", (b"exec", b"\x00\x00\x00\x02id"), "exec", b"hk")
ENTRIES = [Entry("site-a", True)]
MENU = b"1: site-a (online)\r\nq: quit\r\n" + PROMPT


def status(n: int, flushed: bool = True) -> Exit:
    return Exit(b"exit-status", struct.pack(">L", n), flushed)


def direct(**kw: object) -> SessionMachine:
    m = SessionMachine("alice", "site-a", **kw)  # type: ignore[arg-type]
    assert m.session_requested(b"exec", b"\x00\x00\x00\x02id") == (StartSoon(),)
    assert m.state is S.STARTING
    return m


def relaying(m: SessionMachine) -> SessionMachine:
    assert m.start() == (Dial("site-a", b"exec", b"\x00\x00\x00\x02id", m.port),)
    assert m.routed(ROUTE, 100.0) == ()
    m.device_opened()
    assert m.state is S.RELAYING
    return m


def test_one_session_request_per_channel() -> None:
    m = direct()
    assert m.session_requested(b"shell", b"") is None


def test_direct_exec_early_input_exit_and_close() -> None:
    m = direct()
    m.pty_requested(b"pty")
    assert m.operator_data(b"ab") == () and m.operator_data(b"c") == ()
    assert m.operator_eof() == ()
    assert m.start() == (Dial("site-a", b"exec", b"\x00\x00\x00\x02id", None),)
    assert m.operator_data(b"d") == () and m.state is S.CONNECTING
    m.routed(ROUTE, 100.0)
    assert m.device_opened() == [
        DeviceRequest(b"pty-req", b"pty", None),
        DeviceRequest(b"exec", b"\x00\x00\x00\x02id", "the device refused the exec request"),
        ToDevice(b"abcd"), DeviceEOF()]
    assert m.operator_data(b"e") == (Relay(),)
    assert m.device_eof() == (OperatorEOF(),)
    assert m.device_exit(b"exit-status", b"\x00\x00\x00\x03") == (
        Exit(b"exit-status", b"\x00\x00\x00\x03", True),)
    assert m.device_closed() == [Record("site-a", "exec", 100.0), DropDevice(),
                                 Close(flushed=True)]
    assert m.state is S.CLOSING
    assert m.operator_closed() == [DropDevice()]  # recorded once
    assert m.state is S.CLOSED


def test_device_closing_without_exit_status_gives_255() -> None:
    m = relaying(direct())
    assert m.device_closed()[-2:] == [status(255), Close(flushed=True)]


@pytest.mark.parametrize("failure", [
    lambda m: m.login_failed("site-a", "no route"),
    lambda m: m.device_refused("connect failed"),
    lambda m: m.failed("node site-a is offline"),
])
def test_direct_failure_says_why_and_exits_1(failure: object) -> None:
    m = direct()
    m.start()
    m.operator_data(b"held")
    out = failure(m)  # type: ignore[operator]
    assert isinstance(out[0], Stderr) and out[1:] == [status(1), Close(flushed=True)]
    assert m.state is S.CLOSING
    assert m.failed("again") == ()  # only the first failure is told
    assert m.operator_data(b"x") == (Count(1),)


def test_no_node_and_no_terminal() -> None:
    m = SessionMachine("alice")
    m.session_requested(b"exec", b"")
    assert m.start()[0] == Stderr("no node selected: use ssh alice:NODE@hub, "
                                  "or a terminal for the chooser")


def test_chooser_select_return_and_quit() -> None:
    m = SessionMachine("alice")
    m.pty_requested(b"pty")
    m.session_requested(b"shell", b"")
    assert m.operator_data(b"typed ahead") == ()
    assert m.start() == (OfferMenu(b"", flushed=False),)
    assert m.state is S.RETURNING and m.menu_mode
    assert m.operator_data(b"x") == (Count(1),)  # between screens: dropped
    assert m.menu(ENTRIES, b"") == (Write(MENU),)
    assert m.operator_data(b"1") == [Count(1), Write(b"1")]
    assert m.operator_data(b"\r") == [Count(1), Write(b"\r\n"),
                                      Dial("site-a", b"shell", b"", None)]
    m.routed(ROUTE, 5.0)
    assert m.device_opened()[0] == DeviceRequest(b"pty-req", b"pty", None)
    # The device's EOF and exit status stay with the hub: the menu comes back.
    assert m.device_eof() == () and m.device_exit(b"exit-status", b"\0\0\0\0") == ()
    assert m.device_closed() == [
        Record("site-a", "exec", 5.0), DropDevice(),
        OfferMenu(b"\r\nConnection to site-a closed.\r\n", flushed=True)]
    assert m.menu(ENTRIES, b"before") == (Write(b"before" + MENU),)
    assert m.operator_data(b"q\r") == [Count(2), Write(b"q\r\n"), status(0, flushed=False),
                                       Close(flushed=False)]
    assert m.state is S.CLOSING
    assert m.menu(ENTRIES, b"") == ()  # no menu after quitting


def test_chooser_failure_returns_to_the_menu() -> None:
    m = SessionMachine("alice")
    m.pty_requested(b"pty")
    m.session_requested(b"shell", b"")
    m.start()
    m.menu(ENTRIES, b"")
    m.operator_data(b"1\r")
    assert m.failed("node site-a is offline") == [
        Stderr("node site-a is offline"), DropDevice(), OfferMenu(b"", flushed=False)]
    m.menu(ENTRIES, b"")
    m.operator_data(b"1\r")
    m.routed(ROUTE, 7.0)
    m.device_opened()
    # A device that refuses the shell: its session is recorded and let go.
    assert m.failed("the device refused the shell request") == [
        Stderr("the device refused the shell request"), Record("site-a", "exec", 7.0),
        DropDevice(), OfferMenu(b"", flushed=False)]


def test_operator_closing_while_connecting() -> None:
    m = direct()
    m.start()
    m.routed(ROUTE, 1.0)
    assert m.operator_closed() == [Record("site-a", "exec", 1.0), DropDevice()]
    assert m.device_opened() == (DropDevice(),)
    assert m.login_failed("site-a", "late") == ()


def test_moves_table() -> None:
    assert set(MOVES) == set(State)
    assert all(S.CLOSED in targets for targets in MOVES.values())
    m = SessionMachine("alice")
    with pytest.raises(IllegalMove):
        m._move(S.RELAYING)
