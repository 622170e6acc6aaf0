"""The registry's values, and the columns each one is read from.

Each query names its columns from these tuples and each row becomes its value
by name, so a migration that adds or reorders columns cannot shift a field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import field, frozen

STATES = ("pending", "approved", "revoked")
NETCONF = "netconf"  # node kind of a NETCONF call-home device (identified by its host key)

NODE_COLUMNS = ("id", "name", "kind", "key_blob", "fingerprint", "state", "created",
                "last_seen", "peer", "online", "online_since", "public", "device_user",
                "host_key", "console", "hub")
AUDIT_COLUMNS = ("time", "actor", "action", "target", "detail")


def select(columns: Sequence[str], table: str) -> str:
    """`SELECT a, b, ... FROM table`, naming every column."""
    return f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608 (constant names only)


@frozen
class Node:
    id: int
    name: str
    kind: str
    key_blob: bytes | None
    fingerprint: str
    state: str
    created: float
    last_seen: float | None
    peer: str
    online: bool
    online_since: float | None
    public: bool
    device_user: str
    host_key: bytes | None
    forwards: dict[str, int]  # every port lease of the node, service -> port
    console: str | None = None
    # The services of `forwards` listening now (a live forward, not just a lease).
    live: frozenset[str] = frozenset()
    # The hub holding the node's tunnel now (its `[cluster] id`), or None.
    hub: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any], forwards: dict[str, int],
                 live: frozenset[str] = frozenset()) -> Node:
        """The node of a row selected with `NODE_COLUMNS`."""
        values = dict(zip(NODE_COLUMNS, row, strict=True))
        values["online"] = bool(values["online"])
        values["public"] = bool(values["public"])
        return cls(forwards=forwards, live=live, **values)


@frozen
class User:
    name: str
    password_hash: str | None
    keys: tuple[bytes, ...]
    fingerprints: tuple[str, ...]
    allow: tuple[str, ...]
    # Which row this is: (id, created). A user deleted and added again under the
    # same name is another user (SQLite may reuse the id); not part of the value.
    identity: tuple[int, float] | None = field(default=None, eq=False)
    # May approve, revoke, remove and switch access in the web console.
    admin: bool = False


@frozen
class AuditEntry:
    time: float
    actor: str
    action: str
    target: str
    detail: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> AuditEntry:
        """The entry of a row selected with `AUDIT_COLUMNS`."""
        return cls(**dict(zip(AUDIT_COLUMNS, row, strict=True)))
