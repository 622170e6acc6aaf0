"""Bounded fuzzing of the parsers a peer feeds: NSCA, the NETCONF preamble,
login names and the chooser (bench/fuzz.py runs the same targets longer)."""

from __future__ import annotations

from fuzz_targets import (
    NSCA_PLAIN,
    check_chooser,
    check_login,
    check_nsca,
    check_preamble,
    chooser_typed,
    chunks,
    login_text,
    nsca_methods,
    nsca_plain_stream,
    preamble_input,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BOUNDED = settings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@BOUNDED
@given(nsca_plain_stream)
def test_fuzz_nsca_packets(data: list[bytes]) -> None:
    check_nsca(NSCA_PLAIN, b"", bytes(128), data)


@BOUNDED
@given(nsca_methods, st.binary(max_size=16), st.binary(min_size=128, max_size=128), chunks)
def test_fuzz_nsca_any_method(method: int, password: bytes, iv: bytes,
                              data: list[bytes]) -> None:
    check_nsca(method, password, iv, data)


@BOUNDED
@given(preamble_input)
def test_fuzz_netconf_preamble(data: list[bytes]) -> None:
    check_preamble(data)


@BOUNDED
@given(login_text, st.lists(st.text(max_size=12), max_size=4), st.text(max_size=20))
def test_fuzz_login_names(name: str, patterns: list[str], node: str) -> None:
    check_login(name, patterns, node)


@BOUNDED
@given(st.lists(st.tuples(st.text(max_size=12), st.booleans()), max_size=12), chooser_typed)
def test_fuzz_chooser(entries: list[tuple[str, bool]], typed: list[bytes]) -> None:
    check_chooser(entries, typed)
