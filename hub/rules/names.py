"""Node and user names: what a valid name is, and the name a device gets by default."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from hub.errors import BadName

if TYPE_CHECKING:
    from hub.ssh.keys import PublicKeyLine

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def is_valid_name(text: str) -> bool:
    """A node or user name: the whole text (a trailing newline is not part of a name)."""
    return NAME_RE.fullmatch(text) is not None


def default_node_name(key: PublicKeyLine) -> str:
    """NAME when none is given: the key comment (its host part for user@host),
    else a name made from the fingerprint."""
    comment = key.comment.strip()
    for candidate in (comment, comment.rpartition("@")[2]):
        if candidate and is_valid_name(candidate):
            return candidate
    digest = "".join(c for c in key.fingerprint.removeprefix("SHA256:") if c.isalnum())
    return f"node-{digest[:12].lower()}"


def check_node_name(name: str) -> str:
    if not is_valid_name(name):
        raise BadName(
            f"invalid node name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 63, starting with a letter or digit)"
        )
    return name
