"""Disconnects and refused channel opens in words, never as Python reprs."""

from __future__ import annotations

import pytest
from twisted.conch.error import ConchError

from hub.ssh.disconnect import disconnect_text, open_failure_of, open_failure_text


@pytest.mark.parametrize(("code", "description", "text"), [
    (1, b"", "code 1, administratively prohibited"),
    (2, b"Connection refused", "Connection refused (code 2, connect failed)"),
    (3, b"unknown channel type", "unknown channel type (code 3, unknown channel type)"),
    (4, "too many channels", "too many channels (code 4, resource shortage)"),
    (9, b"\xff odd", "\ufffd odd (code 9)"),
])
def test_open_failure_in_words(code: int, description: bytes | str, text: str) -> None:
    assert open_failure_text(code, description) == text


def test_open_failure_of_a_conch_error_and_of_anything_else() -> None:
    assert open_failure_of(ConchError(b"connect failed", 2)) == (
        2, "connect failed (code 2, connect failed)")
    assert open_failure_of(ValueError("gone")) == (None, "gone")


def test_disconnect_text_decodes() -> None:
    assert disconnect_text(11, b"disconnected by user") == "disconnected by user (by application)"
    assert "b'" not in disconnect_text(2, b"\xffbad")
