"""What one operator may reach: the grant check every way in to a device shares.

The console gateway and jump host (`gateway`), and any other front end that acts
for a logged-in operator, ask an `OperatorReach` which node a name stands for,
whether the operator's grants still allow it, and which live tunnel (or NETCONF
call-home session) reaches it. Nothing is contacted before this check.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import evolve
from twisted.internet import defer
from twisted.logger import Logger

from hub.access.needs import GatewayNeeds, Grants, NetconfLink
from hub.access.operators import lapsed
from hub.errors import NotFound
from hub.rules.chooser import Entry
from hub.rules.logins import OperatorLogin, may_reach
from hub.rules.pairs import Pair, active_member, covered
from hub.rules.routes import Refusal, Route, reach, session_route, tunnel_refusal
from hub.ssh.connection import ChannelRefused
from hub.store.registry import NETCONF, Node, User
from hub.tunnel.live import NodeTunnel

log = Logger()


def refused(refusal: Refusal) -> ChannelRefused:
    return ChannelRefused(refusal.reason, refusal.message)


class OperatorReach:
    """An operator's login and grants, checked against the registry at every use.

    The checks decide on `grants`: what the registry said at this use, read in
    the registry thread by `checked` (the avatar itself holds none)."""

    def __init__(self, needs: GatewayNeeds, login: OperatorLogin,
                 peer: Callable[[], str], grants: Grants | None = None) -> None:
        self.needs = needs
        self.login = login
        self._peer = peer
        self._grants = grants

    @property
    def grants(self) -> Grants:
        if self._grants is None:
            raise RuntimeError("an operator's grants are checked on a snapshot: use checked()")
        return self._grants

    def checked(self, *names: str, every_node: bool = False) -> defer.Deferred[OperatorReach]:
        """This operator's reach as the registry says now (read off the reactor):
        their user row, the pairs, and the nodes `names` stand for (or every node)."""
        read = self.needs.grants.snapshot(self.login.user, names, every_node)
        return read.addCallback(
            lambda grants: OperatorReach(self.needs, self.login, self._peer, grants))

    @property
    def actor(self) -> str:
        return f"{self.login.user}@{self._peer()}"

    @property
    def peer(self) -> str:
        """The address the operator connected from."""
        return self._peer()

    def user(self) -> User | None:
        """The operator's user row while this login still stands on it, else None.

        Its grants (`allow`) include the members of the pairs it grants: every
        check of a node name against them then covers a pair's members."""
        try:
            user = self.grants.user(self.login.user)
        except NotFound:
            return None
        if lapsed(self.login, user) is not None:
            return None
        return evolve(user, allow=covered(user.allow, self.grants.pairs()))

    def resolve(self, name: str) -> tuple[Node, NodeTunnel]:
        """The node and live tunnel `name` stands for, if this operator may reach it."""
        node = self.resolve_node(name)
        return node, self.tunnel_of(node)

    def tunnel_of(self, node: Node) -> NodeTunnel:
        """The live call-home tunnel of a (non-NETCONF) node."""
        tunnel = self.needs.tunnels.get(node.name)
        refusal = tunnel_refusal(self.login.user, node, tunnel is not None)
        if refusal is not None:
            raise refused(refusal)
        assert tunnel is not None
        return tunnel

    def resolve_node(self, name: str) -> Node:
        """The approved node `name` stands for, if this operator may reach it."""
        found = self._reach(name)
        if isinstance(found, Refusal):
            raise refused(found)
        return found

    def route(self, name: str, kind: bytes, data: bytes, port: str | None
              ) -> tuple[Route | Refusal, NodeTunnel | NetconfLink | None]:
        """Where a session request for node `name` goes, with the node's live tunnel
        (or NETCONF call-home session) to reach it through."""
        found = self._reach(name)
        if isinstance(found, Refusal):
            return found, None
        if found.kind == NETCONF:
            netconf = self.needs.netconf
            link: NodeTunnel | NetconfLink | None = (
                netconf.get(found.name) if netconf is not None else None)
        else:
            link = self.needs.tunnels.get(found.name)
        return session_route(self.login.user, found, link is not None, kind, data, port), link

    def _reach(self, name: str) -> Node | Refusal:
        user = self.user()
        grants: tuple[str, ...] | None = None if user is None else user.allow
        pair = self.grants.pair(name)
        if pair is not None:
            return self._reach_pair(grants, pair)
        try:
            node: Node | None = self.grants.node(name)
        except NotFound:
            node = None
        found = reach(grants, node, name)
        if isinstance(found, Refusal) and found.note is not None:
            log.info("{actor}: {note}", actor=self.actor, note=found.note)
        return found

    def _reach_pair(self, grants: tuple[str, ...] | None, pair: Pair) -> Node | Refusal:
        """The member `pair` reaches now, if grants allow the pair (a grant on a
        member alone does not)."""
        if grants is None or not may_reach(grants, pair.name):
            found = reach(grants, None, pair.name)
            assert isinstance(found, Refusal)
            log.info("{actor}: not granted pair {pair}", actor=self.actor, pair=pair.name)
            return found
        members = {m: self._member(m) for m in pair.members}
        active = active_member(pair, *(self._up(members[m]) for m in pair.members))
        if isinstance(active, Refusal):
            return active
        node = members[active]
        assert node is not None
        return node

    def _member(self, name: str) -> Node | None:
        try:
            return self.grants.node(name)
        except NotFound:
            return None

    def _up(self, node: Node | None) -> bool:
        """Approved, with its tunnel up (forwarding: a tunnel between its login and
        its first forward reaches nothing yet)."""
        tunnel = None if node is None else self.needs.tunnels.get(node.name)
        return (node is not None and node.state == "approved" and tunnel is not None
                and len(tunnel.table) > 0)

    def pair_status(self, pair: Pair) -> str | Refusal:
        """Which member `pair` reaches now (its name), or why none."""
        return active_member(pair, *(self._up(self._member(m)) for m in pair.members))

    def reachable(self) -> list[Entry]:
        user = self.user()
        if user is None:
            return []
        pairs = [p for p in self.grants.pairs() if may_reach(user.allow, p.name)]
        # A pair is one entry: its members are not listed again (typing a member's
        # name still reaches it).
        members = {m.lower() for p in pairs for m in p.members}
        entries = [Entry(n.name, n.online) for n in self.grants.nodes()
                   if n.state == "approved" and may_reach(user.allow, n.name)
                   and n.name.lower() not in members]
        for pair in pairs:
            active = self.pair_status(pair)
            entries.append(Entry(pair.name, False, "none online") if isinstance(active, Refusal)
                           else Entry(pair.name, True, f"{pair.role(active)} {active}"))
        return entries
