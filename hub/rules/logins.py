"""Who a login name is and what it may reach: pure rules, no I/O.

`parse_login` reads the operator's login name (`alice`, `alice:NODE`,
`alice:NODE:PORT`, the Opengear way); `may_reach` checks a node against an
operator's grant patterns.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from attrs import field, frozen
from twisted.cred.error import UnauthorizedLogin

from hub.store.rows import Node


@frozen
class DeviceLogin:
    """A login as the registrar user: `node` is None for a password login.

    `record` is the node as the key check read it, and `read_at` the count of
    registry listings the hub had applied when that read was asked for
    (`LiveSessions.applied`): the first forward's takeover takes that record
    instead of reading the node again while the count has not moved."""

    node: str | None
    record: Node | None = field(default=None, eq=False)
    read_at: int | None = field(default=None, eq=False)


@frozen
class OperatorLogin:
    """An operator, with what the login name selected (`alice:node[:port]`)."""

    user: str
    node: str | None = None
    port: str | None = None
    # What the login stands on, for re-checking a live connection when the
    # operator is changed: the user row's identity (id, created) and the key blob
    # (bytes) or the password hash (str) it used. Not part of what the name selected.
    identity: tuple[int, float] | None = field(default=None, eq=False)
    credential: bytes | str | None = field(default=None, eq=False)


def parse_login(name: str) -> OperatorLogin:
    """`alice`, `alice:NODE` or `alice:NODE:PORT` (the Opengear way)."""
    parts = name.split(":")
    if len(parts) > 3 or any(not part for part in parts):
        raise UnauthorizedLogin(f"malformed login name {name!r}")
    node = parts[1] if len(parts) > 1 else None
    port = parts[2] if len(parts) > 2 else None
    return OperatorLogin(parts[0], node, port)


def may_reach(patterns: tuple[str, ...], node: str) -> bool:
    """Whether grant patterns (shell globs, case-insensitive) allow `node`."""
    return any(fnmatch.fnmatchcase(node.lower(), p.lower()) for p in patterns)


def reach_matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """`may_reach` for many nodes: the patterns compiled once into one expression."""
    if not patterns:
        return lambda node: False
    expression = re.compile("|".join(f"(?:{fnmatch.translate(p.lower())})" for p in patterns))
    return lambda node: expression.match(node.lower()) is not None
