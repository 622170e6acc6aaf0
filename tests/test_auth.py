"""Credential checkers in memory: what they accept, and what refusing costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from hub.access.auth import DUMMY_HASH, CallHomePasswordChecker, check_password, hash_password
from hub.rules.logins import OperatorLogin
from hub.store.registry import Registry


def test_refusing_an_unknown_operator_costs_the_same_bcrypt_work(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    registry.add_user("alice", hash_password(b"right", rounds=4), [], ["*"], "test")
    registry.add_user("bob", None, [(b"key", "SHA256:x")], ["*"], "test")
    calls: list[tuple[Any, tuple[Any, ...]]] = []

    def run(f: Any, *args: Any) -> defer.Deferred[Any]:
        calls.append((f, args))
        return defer.maybeDeferred(f, *args)

    checker = CallHomePasswordChecker(registry, "cms", run)
    for name, why in [(b"mallory", "no operator 'mallory'"),
                      (b"bob", "operator bob has no password"),
                      (b"a::b", "no operator 'a::b'")]:
        refused: list[Any] = []
        checker.requestAvatarId(UsernamePassword(name, b"guess")).addErrback(refused.append)
        [failure] = refused
        assert failure.check(UnauthorizedLogin) and failure.getErrorMessage() == why
    assert calls == [(check_password, (b"guess", DUMMY_HASH))] * 3
    # The same bcrypt cost as a stored password, so the refusal takes as long.
    assert DUMMY_HASH.split("$")[2] == hash_password(b"x").split("$")[2] == "12"
    ok = checker.requestAvatarId(UsernamePassword(b"alice:site-a", b"right"))
    assert ok.result == OperatorLogin("alice", "site-a")  # type: ignore[attr-defined]
