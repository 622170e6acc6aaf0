"""Live operator connections, re-checked whenever the registry changes.

An operator's login stands on a user row, one of its keys or its password,
and its grants. `user del`, `user set` and a user deleted and added again
under the same name change these while the operator is connected; the hub's
registry poll (`Hub.sync`) then calls `LiveOperators.enforce`, which ends the
connections whose login no longer stands and narrows the others to what their
grants still allow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from hub.rules.logins import OperatorLogin
from hub.rules.pairs import covered

if TYPE_CHECKING:
    from hub.rules.pairs import Pair
    from hub.store.registry import Registry, User

log = Logger()


def lapsed(login: OperatorLogin, user: User | None) -> str | None:
    """Why a live login no longer stands (the peer is told), or None if it does."""
    if user is None:
        return f"operator {login.user} was deleted on the hub"
    if login.identity is not None and user.identity != login.identity:
        return f"operator {login.user} was replaced on the hub"
    credential = login.credential
    if isinstance(credential, bytes) and credential not in user.keys:
        return f"the key operator {login.user} logged in with was removed on the hub"
    if isinstance(credential, str) and credential != user.password_hash:
        return f"the password of operator {login.user} was changed on the hub"
    return None


class LiveOperator(Protocol):
    """What `LiveOperators` needs of a logged-in operator (the gateway's avatar)."""

    login: OperatorLogin

    def end(self, why: str) -> None:
        """Disconnect, telling the peer why."""

    def narrow(self, allow: tuple[str, ...]) -> None:
        """Close the channels to nodes that `allow` no longer grants."""


# Every operator and pair on file, read together in the registry thread.
Listed = tuple[list["User"], list["Pair"]]


def read_operators(registry: Registry) -> Listed:
    return registry.users(), registry.pairs()


class LiveOperators:
    """The operators connected now; the avatar adds itself at login, removes itself at logout."""

    def __init__(self, read: Callable[[], Deferred[Listed]]) -> None:
        # Reads every operator and pair off the reactor (`read_operators` in the
        # registry thread).
        self.read = read
        self._live: dict[int, LiveOperator] = {}

    def add(self, operator: LiveOperator) -> None:
        self._live[id(operator)] = operator

    def discard(self, operator: LiveOperator) -> None:
        self._live.pop(id(operator), None)

    def __len__(self) -> int:
        return len(self._live)

    def enforce(self, listed: Listed | None = None) -> Deferred[None]:
        """Apply operator changes to the live connections; `listed` is every
        operator and pair on file, read off the reactor (None: read now)."""
        if listed is None:
            return self.read().addCallback(self._enforce)
        self._enforce(listed)
        return succeed(None)

    def _enforce(self, listed: Listed) -> None:
        on_file = {u.name.lower(): u for u in listed[0]}
        pairs = listed[1]
        for operator in list(self._live.values()):
            login = operator.login
            user = on_file.get(login.user.lower())
            why = lapsed(login, user)
            if why is not None:
                log.info("{why}: ending its connection", why=why)
                self.discard(operator)
                operator.end(why)
            elif user is not None:
                # A grant on a pair covers its members (hub.rules.pairs).
                operator.narrow(covered(user.allow, pairs))
