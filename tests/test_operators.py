"""Whether a live operator login still stands, and the user identity it stands on."""

from __future__ import annotations

import pytest

from hub.access.operators import lapsed
from hub.rules.logins import OperatorLogin
from hub.store.registry import Registry, User


@pytest.fixture
def registry(registry_at: str) -> Registry:
    return Registry(registry_at, now=lambda: 0.0)


def test_a_user_added_again_under_the_same_name_is_another_user(registry: Registry) -> None:
    first = registry.add_user("alice", None, [(b"k", "fp")], ["site-*"], "t")
    registry.del_user("alice", "t")
    # Same name, key, grants and creation time: only the identity tells them apart.
    second = registry.add_user("alice", None, [(b"k", "fp")], ["site-*"], "t")
    assert first == second and first.identity != second.identity
    bob = registry.add_user("bob", None, [(b"b", "fp")], [], "t")
    assert len({first.identity, second.identity, bob.identity}) == 3


def test_set_user_keeps_the_identity(registry: Registry) -> None:
    alice = registry.add_user("alice", "hash", [(b"k", "fp")], ["site-*"], "t")
    changed = registry.set_user("alice", "t", allow=["lab"], keys=[(b"k2", "fp2")])
    assert changed.identity == alice.identity
    assert (changed.allow, changed.keys, changed.password_hash) == (("lab",), (b"k2",), "hash")


def user(identity: tuple[int, float] = (1, 0.0), keys: tuple[bytes, ...] = (b"k",),
         password_hash: str | None = "hash") -> User:
    return User("alice", password_hash, keys, ("fp",) * len(keys), ("site-*",), identity)


@pytest.mark.parametrize(("login", "row", "why"), [
    (OperatorLogin("alice", identity=(1, 0.0), credential=b"k"), user(), None),
    (OperatorLogin("alice", identity=(1, 0.0), credential="hash"), user(), None),
    (OperatorLogin("alice", identity=(1, 0.0), credential=b"k"), None,
     "operator alice was deleted on the hub"),
    (OperatorLogin("alice", identity=(1, 0.0), credential=b"k"), user((2, 0.0)),
     "operator alice was replaced on the hub"),
    (OperatorLogin("alice", identity=(1, 0.0), credential=b"k"), user(keys=(b"other",)),
     "the key operator alice logged in with was removed on the hub"),
    (OperatorLogin("alice", identity=(1, 0.0), credential="hash"), user(password_hash="new"),
     "the password of operator alice was changed on the hub"),
    (OperatorLogin("alice", identity=(1, 0.0), credential="hash"), user(password_hash=None),
     "the password of operator alice was changed on the hub"),
])
def test_lapsed(login: OperatorLogin, row: User | None, why: str | None) -> None:
    assert lapsed(login, row) == why
