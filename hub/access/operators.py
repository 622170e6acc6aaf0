"""Live operator connections, re-checked whenever the registry changes.

An operator's login stands on a user row, one of its keys or its password,
and its grants. `user del`, `user set` and a user deleted and added again
under the same name change these while the operator is connected; the hub's
registry poll (`Hub.sync`) then calls `LiveOperators.enforce`, which ends the
connections whose login no longer stands and narrows the others to what their
grants still allow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

from hub.errors import NotFound
from hub.rules.logins import OperatorLogin
from hub.rules.pairs import covered

if TYPE_CHECKING:
    from hub.access.needs import Grants
    from hub.rules.pairs import Pair
    from hub.store.registry import User

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


class LiveOperators:
    """The operators connected now; the avatar adds itself at login, removes itself at logout."""

    def __init__(self, grants: Grants) -> None:
        self.grants = grants
        self._live: dict[int, LiveOperator] = {}

    def add(self, operator: LiveOperator) -> None:
        self._live[id(operator)] = operator

    def discard(self, operator: LiveOperator) -> None:
        self._live.pop(id(operator), None)

    def __len__(self) -> int:
        return len(self._live)

    def enforce(self, listed: tuple[list[User], list[Pair]] | None = None) -> None:
        """Apply operator changes to the live connections; `listed` is every
        operator and pair on file, read off the reactor (None: read here)."""
        users: dict[str, User | None] = {}
        on_file = None if listed is None else {u.name: u for u in listed[0]}
        pairs = listed[1] if listed is not None else self.grants.pairs() if self._live else []
        for operator in list(self._live.values()):
            login = operator.login
            name = login.user.lower()
            if name not in users:
                try:
                    users[name] = (self.grants.user(login.user) if on_file is None
                                   else on_file.get(login.user))
                except NotFound:
                    users[name] = None
            user = users[name]
            why = lapsed(login, user)
            if why is not None:
                log.info("{why}: ending its connection", why=why)
                self.discard(operator)
                operator.end(why)
            elif user is not None:
                # A grant on a pair covers its members (hub.rules.pairs).
                operator.narrow(covered(user.allow, pairs))
