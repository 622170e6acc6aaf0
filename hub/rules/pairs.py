"""Master/clone pairs: which member a pair's name reaches now, and what a grant on it covers.

Pure rules. A pair (Escaux "Master/Clone", an active/standby appliance pair) is
a name standing for two nodes: it reaches the master while the master is
online (approved, its tunnel up), else the clone; neither online is refused as
offline. A grant on the pair's name covers both members; a grant on a member
alone does not cover the pair.
"""

from __future__ import annotations

from attrs import field, frozen
from twisted.conch.ssh.connection import OPEN_CONNECT_FAILED

from hub.rules.logins import may_reach
from hub.rules.names import is_valid_name
from hub.rules.routes import Refusal

MASTER = "master"
CLONE = "clone"


@frozen
class Pair:
    """A pair as recorded: its name, its members, its access switch and its own leases."""

    name: str
    master: str
    clone: str
    public: bool = False
    forwards: dict[str, int] = field(factory=dict)  # the pair's own leases, service -> port
    live: frozenset[str] = frozenset()  # the services of `forwards` listening now

    def role(self, node: str) -> str | None:
        """`master`, `clone`, or None for a node outside the pair."""
        if node.lower() == self.master.lower():
            return MASTER
        if node.lower() == self.clone.lower():
            return CLONE
        return None

    @property
    def members(self) -> tuple[str, str]:
        return self.master, self.clone


def active_member(pair: Pair, master_online: bool, clone_online: bool) -> str | Refusal:
    """The member `pair` reaches now. `*_online`: approved with its tunnel up."""
    if master_online:
        return pair.master
    if clone_online:
        return pair.clone
    return Refusal(f"pair {pair.name} is offline (master {pair.master} and clone "
                   f"{pair.clone} are both offline)", OPEN_CONNECT_FAILED)


def covered(allow: tuple[str, ...], pairs: list[Pair]) -> tuple[str, ...]:
    """Grant patterns `allow` with the members of every pair they grant added
    (as exact names: node names hold no glob characters)."""
    extra = [m for p in pairs if may_reach(allow, p.name) for m in p.members
             if not may_reach(allow, m)]
    return allow + tuple(dict.fromkeys(extra))


def pair_problem(name: str, master: str, clone: str, nodes: set[str],
                 pairs: list[Pair]) -> str | None:
    """Why `pair add NAME MASTER CLONE` cannot be recorded, or None.

    `nodes`: the (lower-cased) names of the registered nodes."""
    if not is_valid_name(name):
        return (f"invalid pair name {name!r}: use letters, digits, '.', '_' or '-' "
                "(at most 63, starting with a letter or digit)")
    if name.lower() in nodes:
        return f"{name} is the name of a node: a pair needs a name of its own"
    if any(p.name.lower() == name.lower() for p in pairs):
        return f"pair {name} already exists"
    for member in (master, clone):
        if member.lower() not in nodes:
            return f"no node named {member!r}"
    if master.lower() == clone.lower():
        return "the master and the clone must be two different nodes"
    for member in (master, clone):
        for p in pairs:
            role = p.role(member)
            if role is not None:
                return f"node {member} is already the {role} of pair {p.name}"
    return None


def fleet_pairs(pattern: str, pairs: list[Pair]) -> list[Pair]:
    """The pairs a fleet command (`run --nodes GLOB`) takes as one node each: those
    whose name matches and neither of whose members does (a member matched is run
    on as itself; the pair again would run the command twice on one device)."""
    return [p for p in pairs if may_reach((pattern,), p.name)
            and not any(may_reach((pattern,), m) for m in p.members)]
