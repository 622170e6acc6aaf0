"""Credential checkers in memory: what they accept, and what refusing costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.credentials import SSHPrivateKey, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from hub.access.auth import (
    DUMMY_HASH,
    CallHomePasswordChecker,
    DeviceKeyChecker,
    NoPasswordWarnings,
    check_password,
    hash_password,
)
from hub.rules.logins import OperatorLogin
from hub.store.offthread import InlineCalls
from hub.store.registry import Registry


def test_refusing_an_unknown_operator_costs_the_same_bcrypt_work(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    registry.add_user("alice", hash_password(b"right", rounds=4), [], ["*"], "test")
    registry.add_user("bob", None, [(b"key", "SHA256:x")], ["*"], "test")
    calls: list[tuple[Any, tuple[Any, ...]]] = []

    def run(f: Any, *args: Any) -> defer.Deferred[Any]:
        calls.append((f, args))
        return defer.maybeDeferred(f, *args)

    checker = CallHomePasswordChecker(InlineCalls(registry), "cms", run)
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


def warnings_in(events: list[Any]) -> list[str]:
    return [formatEvent(e) or "" for e in events if e.get("log_level") == LogLevel.warn]


def test_no_call_home_password_warning_at_most_once_a_minute() -> None:
    clock = MemoryReactorClock()
    warnings = NoPasswordWarnings(clock)
    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        warnings.refused("203.0.113.9")
        for _ in range(5):
            clock.advance(10)
            warnings.refused("203.0.113.10")
        assert len(warnings_in(events)) == 1  # 50 s: still the first line only
        clock.advance(10)
        warnings.refused("203.0.113.11")
    finally:
        globalLogPublisher.removeObserver(events.append)
    hint = "no Call Home Password is set (set one with: callhomehub callhome-password)"
    assert warnings_in(events) == [
        f"device login refused from 203.0.113.9: {hint}; 1 refused since the last warning",
        f"device login refused from 203.0.113.11: {hint}; 6 refused since the last warning",
    ]


def test_a_refused_signature_algorithm_is_named_in_words(tmp_path: Path) -> None:
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    checker = DeviceKeyChecker(InlineCalls(registry), "cms")
    refused: list[Any] = []
    checker.requestAvatarId(SSHPrivateKey(b"cms", b"ssh-dss", b"blob", b"data", b"sig")
                            ).addErrback(refused.append)
    [failure] = refused
    assert failure.getErrorMessage() == "signature algorithm ssh-dss not allowed"


class CountingCalls:
    """InlineCalls that count each registry function called."""

    def __init__(self, registry: Registry) -> None:
        self.inner, self.names = InlineCalls(registry), []

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.names.append(fn.__name__)
        return self.inner.call(fn, *args, **kwargs)


def test_the_signed_request_after_a_probe_reads_the_key_once(tmp_path: Path) -> None:
    """A client probes with its key, then signs: one read of the key's node for
    both, unless a registry change was applied in between (then the signed
    request reads again, and a revocation is seen)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.conch.error import ValidPublicKey
    from twisted.conch.ssh import keys
    from twisted.cred.credentials import SSHPrivateKey

    from hub.rules.logins import DeviceLogin

    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    blob = key.public().blob()
    registry.register("site-a", blob, "SHA256:x", "test")
    calls, applied = CountingCalls(registry), [0]
    checker = DeviceKeyChecker(calls, "cms", changes=lambda: applied[0])  # type: ignore[arg-type]

    def login(signed: bool) -> Any:
        data = b"signed data"
        credentials = SSHPrivateKey(b"cms", b"ssh-ed25519", blob, data if signed else None,
                                    key.sign(data) if signed else None)
        outcome: list[Any] = []
        checker.requestAvatarId(credentials).addBoth(outcome.append)
        return outcome[0]

    assert login(False).check(ValidPublicKey)
    assert login(True) == DeviceLogin("site-a")
    assert calls.names == ["node_by_key"]
    # The kept node went with its signed request: the next login reads again.
    assert login(True) == DeviceLogin("site-a")
    assert calls.names == ["node_by_key"] * 2
    # A registry change applied between the probe and the signature: read again.
    assert login(False).check(ValidPublicKey)
    registry.set_state("site-a", "revoked", "cli:test")
    applied[0] += 1
    refused = login(True)
    assert refused.check(UnauthorizedLogin) and "revoked" in refused.getErrorMessage()
    assert calls.names == ["node_by_key"] * 4
