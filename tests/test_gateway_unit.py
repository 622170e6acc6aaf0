"""Gateway rules without a reactor: login names, grants, the chooser."""

from __future__ import annotations

import pytest
from twisted.cred.error import UnauthorizedLogin

from hub.rules.chooser import PROMPT, Chooser, Entry, Quit, Select
from hub.rules.logins import OperatorLogin, may_reach, parse_login


@pytest.mark.parametrize(("name", "expected"), [
    ("alice", OperatorLogin("alice")),
    ("alice:site-a", OperatorLogin("alice", "site-a")),
    ("alice:site-a:port02", OperatorLogin("alice", "site-a", "port02")),
])
def test_parse_login(name: str, expected: OperatorLogin) -> None:
    assert parse_login(name) == expected


@pytest.mark.parametrize("name", ["", ":", "alice:", ":node", "a:b:c:d", "alice::p"])
def test_parse_login_refuses_malformed_names(name: str) -> None:
    with pytest.raises(UnauthorizedLogin):
        parse_login(name)


@pytest.mark.parametrize(("patterns", "node", "allowed"), [
    (("site-*",), "site-a", True),
    (("site-*",), "SITE-A", True),
    (("SITE-?",), "site-b", True),
    (("site-*",), "lab-1", False),
    ((), "site-a", False),
    (("lab-1", "site-[ab]"), "site-b", True),
    (("site-[ab]",), "site-c", False),
    (("*",), "anything", True),
])
def test_grants_are_case_insensitive_globs(patterns: tuple[str, ...], node: str,
                                           allowed: bool) -> None:
    assert may_reach(patterns, node) is allowed


def chooser() -> Chooser:
    return Chooser([Entry("site-a", True), Entry("lab-1", False)])


def test_menu_lists_nodes_with_state() -> None:
    menu = chooser().menu()
    assert menu == b"1: site-a (online)\r\n2: lab-1 (offline)\r\nq: quit\r\n" + PROMPT
    assert Chooser([]).menu().startswith(b"No nodes are available to you.")


@pytest.mark.parametrize(("typed", "decision"), [
    (b"1\r", Select("site-a")),
    (b"2\n", Select("lab-1")),
    (b"LAB-1\r", Select("lab-1")),
    (b"q\r", Quit()),
    (b"\x04", Quit()),
])
def test_choices(typed: bytes, decision: object) -> None:
    assert chooser().feed(typed)[1] == decision


def test_line_editing_and_errors() -> None:
    c = chooser()
    echo, decision = c.feed(b"sitx\x7fe-b\r")
    assert decision is None
    assert echo == b"sitx\x08 \x08e-b\r\nNo such node: site-b\r\n" + PROMPT
    echo, decision = c.feed(b"9\r")
    assert b"No node number 9." in echo and decision is None
    echo, decision = c.feed(b"abc\x03")
    assert echo.endswith(b"^C\r\n" + PROMPT)
    assert c.feed(b"1\r")[1] == Select("site-a")  # the abandoned line is gone
    assert c.feed(b"\r")[0] == b"\r\n" + PROMPT  # an empty line just prompts again


def test_ctrl_d_only_quits_on_an_empty_line_and_escapes_are_ignored() -> None:
    c = chooser()
    assert c.feed(b"x\x04")[1] is None
    echo, decision = c.feed(b"\x7f\x1b[A\x1bOB1\r")
    assert decision == Select("site-a")
    assert b"[" not in echo
