"""Bounded fuzzing of the SSH layers a peer reaches: the packet layer before
and after key exchange, user auth, and the connection layer of a logged-in
registrar (global requests, channel opens, channel requests). No traceback,
whatever is sent; bench/fuzz.py runs the same targets longer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fuzz_peers import new_hub
from fuzz_targets import (
    check_ssh_after_kex,
    check_ssh_before_kex,
    check_ssh_client_after_login,
    check_ssh_client_before_kex,
    check_ssh_framing,
    connection_message,
    transport_message,
    userauth_message,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Each example is a new connection; the logged-in ones include a key exchange.
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def hub_parts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return new_hub(Path(tmp_path_factory.mktemp("fuzz-hub")))


@QUICK
@given(messages=st.lists(transport_message, min_size=1, max_size=4))
def test_fuzz_server_before_kex(hub_parts: Any, messages: list[bytes]) -> None:
    check_ssh_before_kex(hub_parts[2], messages)


@QUICK
@given(data=st.binary(max_size=200))
def test_fuzz_server_framing(hub_parts: Any, data: bytes) -> None:
    check_ssh_framing(hub_parts[2], data)


@QUICK
@given(messages=st.lists(transport_message, min_size=1, max_size=4))
def test_fuzz_client_before_kex(messages: list[bytes]) -> None:
    check_ssh_client_before_kex(messages)


@SLOW
@given(messages=st.lists(userauth_message, min_size=1, max_size=3))
def test_fuzz_user_auth(hub_parts: Any, messages: list[bytes]) -> None:
    _hub, clock, factory, key = hub_parts
    check_ssh_after_kex(factory, clock, key, None, messages)


@SLOW
@given(messages=st.lists(connection_message, min_size=1, max_size=5),
       session_first=st.booleans())
def test_fuzz_connection_layer(hub_parts: Any, messages: list[bytes],
                               session_first: bool) -> None:
    _hub, clock, factory, key = hub_parts
    check_ssh_after_kex(factory, clock, key, b"cms", messages, session_first)


@SLOW
@given(messages=st.lists(connection_message, min_size=1, max_size=5))
def test_fuzz_client_after_login(messages: list[bytes]) -> None:
    check_ssh_client_after_login(messages)
