"""Which device a NETCONF call home is, and the live call-home session of each node.

`identify` decides from the device's host key and the DEVICE-ID it claims
(refuse, pending approval, or an approved node); `NetconfSessions` keeps the
session of each node and applies revocation and removal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from attrs import Factory, define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hub.errors import NotFound
from hub.ssh.keys import fingerprint
from hub.store.offthread import InlineCalls, RegistryCalls
from hub.store.registry import Node, Registry
from hub.store.revisions import NodeUpdate
from hub.tunnel.live import close_connection

log = Logger()

REFUSE, PENDING, APPROVED = "refuse", "pending", "approved"


def default_name(host_key: bytes) -> str:
    """The node name of a device that gave no DEVICE-ID (a valid name, see rules.names)."""
    return "netconf-" + hashlib.sha256(host_key).hexdigest()[:12]


@frozen
class Decision:
    action: str  # REFUSE, PENDING or APPROVED
    name: str = ""
    reason: str = ""
    known: bool = True  # False: the registry does not know the device's host key
    conflict: bool = False  # an unknown key claims the name of an existing node


# The node holding a device's host key, else the node holding the name it would get.
Found = tuple[Node | None, Node | None]


def lookup(registry: Registry, host_key: bytes, device_id: str | None) -> Found:
    """What `decide` needs of the registry (one call in the registry thread)."""
    node = registry.node_by_host_key(host_key)
    if node is not None:
        return node, None
    try:
        return None, registry.node(device_id or default_name(host_key))
    except NotFound:
        return None, None


def identify(registry: Registry, host_key: bytes, device_id: str | None,
             may_enroll: Callable[[str], bool]) -> Decision:
    """Which node a calling device is, by its host key, and what to do with it.

    An unknown device becomes pending only if `may_enroll(name)`."""
    return decide(lookup(registry, host_key, device_id), host_key, device_id, may_enroll)


def decide(found: Found, host_key: bytes, device_id: str | None,
           may_enroll: Callable[[str], bool]) -> Decision:
    """`identify` on what `lookup` read."""
    node, existing = found
    if node is not None:
        if node.state == "revoked":
            return Decision(REFUSE, node.name, f"node {node.name} is revoked")
        return Decision(APPROVED if node.state == "approved" else PENDING, node.name)
    name = device_id or default_name(host_key)
    if existing is None:
        if may_enroll(name):
            return Decision(PENDING, name, known=False)
        return Decision(REFUSE, name, f"unknown device {name} is not on the [netconf] allow "
                        "list and sent no verified HMAC", known=False)
    if existing.kind == "netconf" and existing.state == "approved":
        return Decision(REFUSE, existing.name, (
            f"node {existing.name}: device host key changed: pinned {existing.fingerprint}, "
            f"now {fingerprint(host_key)}; remove the node and approve it again if expected"),
            known=False, conflict=True)
    return Decision(REFUSE, existing.name,
                    f"node name {existing.name!r} is held by another key", known=False,
                    conflict=True)


@define(eq=False)
class NetconfSession:
    node: str
    conn: Any
    peer: str


@define(eq=False)
class NetconfSessions:
    """The live call-home session of each NETCONF node."""

    registry: Registry
    clock: IReactorTime
    _live: dict[str, NetconfSession] = field(factory=dict)
    # Registry calls off the reactor (hub.store.offthread); the hub's RegistryThread.
    calls: RegistryCalls = field(
        default=Factory(lambda self: InlineCalls(self.registry), takes_self=True))

    def attach(self, node: str, conn: Any, peer: str) -> NetconfSession:
        session = NetconfSession(node, conn, peer)
        old = self._live.get(node.lower())
        self._live[node.lower()] = session
        if old is not None and old.conn is not conn:
            log.info("netconf node {node} called home again from {peer}: closing its old "
                     "session", node=node, peer=peer)
            close_connection(old.conn, self.clock, "superseded by a new call home of this node")
        self.calls.write(Registry.mark_online, node, peer)
        log.info("netconf node {node} online from {peer}", node=node, peer=peer)
        return session

    def detach(self, session: NetconfSession) -> None:
        if self._live.get(session.node.lower()) is session:
            del self._live[session.node.lower()]
            self.calls.write(Registry.mark_offline, session.node)
            log.info("netconf node {node} offline", node=session.node)

    def get(self, node: str) -> NetconfSession | None:
        return self._live.get(node.lower())

    def enforce(self, nodes: NodeUpdate | None = None) -> None:
        """Drop the sessions of nodes revoked or removed through the CLI; `nodes`
        is the registry's list, read off the reactor (read here if None): only
        its changed nodes are looked at unless nodes may have gone."""
        update = NodeUpdate.of(self.registry.nodes()) if nodes is None else nodes
        keys = (list(self._live) if update.whole
                else [k for k in (n.name.lower() for n in update.changed) if k in self._live])
        for key in keys:
            session = self._live[key]
            node = update.nodes.get(key)
            state = "removed" if node is None else node.state
            if state in ("revoked", "removed"):
                log.info("netconf node {node} {state}: dropping its session", node=key,
                         state=state)
                del self._live[key]
                if state == "revoked":
                    self.calls.write(Registry.mark_offline, key)
                close_connection(session.conn, self.clock, f"node {key} was {state} on the hub")
