"""A longer fuzz run of the targets the test suite runs briefly (tests/fuzz_targets.py).

    .venv/bin/python bench/fuzz.py [--seconds S] [--only NAME ...] [--batch N]

Every target gets an equal share of S seconds (default 60), in batches of N
hypothesis examples, each batch with a new random seed. All in memory: the
SSH targets join the hub's server (or its SSH client) to a hostile peer with
iosim on a MemoryReactorClock; nothing listens on a socket. Prints, per
target, the cases run and the failures found (a traceback in the log, an
exception out of a parser, a connection left open after a protocol error),
with hypothesis's smallest failing example for each; exits 1 if any failed.
Each failure belongs in a regression test (tests/test_fuzz_*.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_peers import new_hub
from fuzz_targets import (
    NSCA_PLAIN,
    check_chooser,
    check_login,
    check_nsca,
    check_preamble,
    check_ssh_after_kex,
    check_ssh_before_kex,
    check_ssh_client_after_login,
    check_ssh_client_before_kex,
    check_ssh_framing,
    chooser_typed,
    chunks,
    connection_message,
    login_text,
    nsca_methods,
    nsca_plain_stream,
    preamble_input,
    transport_message,
    userauth_message,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException


def targets(hub: Any, counted: Callable[[Callable[..., None]], Callable[..., None]]
            ) -> dict[str, tuple[Any, Callable[..., None]]]:
    """name -> (strategy of the target's keyword arguments, target)."""
    _hub, clock, factory, key = hub
    return {
        "ssh-server-before-kex": (
            st.fixed_dictionaries({"messages": st.lists(transport_message, min_size=1,
                                                        max_size=6)}),
            counted(lambda messages: check_ssh_before_kex(factory, messages))),
        "ssh-server-framing": (
            st.fixed_dictionaries({"data": st.binary(max_size=400)}),
            counted(lambda data: check_ssh_framing(factory, data))),
        "ssh-client-before-kex": (
            st.fixed_dictionaries({"messages": st.lists(transport_message, min_size=1,
                                                        max_size=6)}),
            counted(check_ssh_client_before_kex)),
        "ssh-client-after-login": (
            st.fixed_dictionaries({"messages": st.lists(connection_message, min_size=1,
                                                        max_size=8)}),
            counted(check_ssh_client_after_login)),
        "ssh-user-auth": (
            st.fixed_dictionaries({"messages": st.lists(userauth_message, min_size=1,
                                                        max_size=4)}),
            counted(lambda messages: check_ssh_after_kex(factory, clock, key, None,
                                                         messages))),
        "ssh-connection-layer": (
            st.fixed_dictionaries({"messages": st.lists(connection_message, min_size=1,
                                                        max_size=8),
                                   "session_first": st.booleans()}),
            counted(lambda messages, session_first: check_ssh_after_kex(
                factory, clock, key, b"cms", messages, session_first))),
        "nsca-packets": (
            st.fixed_dictionaries({"data": nsca_plain_stream}),
            counted(lambda data: check_nsca(NSCA_PLAIN, b"", bytes(128), data))),
        "nsca-any-method": (
            st.fixed_dictionaries({"method": nsca_methods, "password": st.binary(max_size=16),
                                   "iv": st.binary(min_size=128, max_size=128),
                                   "data": chunks}),
            counted(check_nsca)),
        "netconf-preamble": (
            st.fixed_dictionaries({"data": preamble_input}), counted(check_preamble)),
        "login-names": (
            st.fixed_dictionaries({"name": login_text,
                                   "patterns": st.lists(st.text(max_size=12), max_size=4),
                                   "node": st.text(max_size=20)}),
            counted(check_login)),
        "chooser": (
            st.fixed_dictionaries({
                "entries": st.lists(st.tuples(st.text(max_size=12), st.booleans()),
                                    max_size=12),
                "typed": chooser_typed}),
            counted(check_chooser)),
    }


def make_batch(strategy: Any, target: Callable[..., None], examples: int) -> Callable[[], None]:
    """One hypothesis run of `target` (a new random seed each call)."""

    def run(kw: dict[str, Any]) -> None:
        target(**kw)

    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(given(strategy)(run))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="total time, shared equally by the targets (default 60)")
    parser.add_argument("--batch", type=int, default=200,
                        help="examples per hypothesis run (default 200)")
    parser.add_argument("--only", nargs="*", default=None, help="target names to run")
    args = parser.parse_args()

    cases = {"n": 0}

    def counted(target: Callable[..., None]) -> Callable[..., None]:
        def run(**kw: Any) -> None:
            cases["n"] += 1
            target(**kw)
        return run

    with tempfile.TemporaryDirectory(prefix="fuzz-hub-") as data:
        table = targets(new_hub(Path(data)), counted)
        names = args.only or list(table)
        unknown = [n for n in names if n not in table]
        if unknown:
            parser.error(f"unknown targets {unknown}; known: {', '.join(table)}")
        share = args.seconds / len(names)
        total_cases = total_failures = 0
        print(f"{'target':24} {'cases':>8} {'failures':>8}")
        for name in names:
            strategy, target = table[name]
            batch = make_batch(strategy, target, args.batch)
            cases["n"] = 0
            failures = 0
            deadline = time.monotonic() + share
            while time.monotonic() < deadline:
                try:
                    batch()
                except HypothesisException:
                    raise  # the harness is wrong, not the hub
                except Exception:
                    failures += 1
                    print(f"--- {name}: failure {failures}", file=sys.stderr)
                    traceback.print_exc(limit=-3)
            print(f"{name:24} {cases['n']:>8} {failures:>8}", flush=True)
            total_cases += cases["n"]
            total_failures += failures
        print(f"{'total':24} {total_cases:>8} {total_failures:>8}")
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
