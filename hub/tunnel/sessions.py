"""Which connection (and tunnel) carries each node now: takeover, revocation, loss.

A node's connection that asks for a forward takes over at once (the old one is
closed and its listeners released first); connections that only register or
send results take nothing over. Registry changes made by the admin CLI
(revocation, removal, public access) are applied here when the hub notices them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import Factory, define, field
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.errors import NotFound
from hub.rules.pairs import Pair
from hub.rules.ports import BusyPorts, ForwardCaps
from hub.store.offthread import InlineCalls, RegistryCalls
from hub.store.registry import Node, Registry
from hub.store.revisions import NodeUpdate
from hub.tunnel.descriptors import DescriptorReserve
from hub.tunnel.live import NodeTunnel, close_connection
from hub.tunnel.pairs import LivePairs
from hub.tunnel.traffic import Traffic

log = Logger()

# How often a connected node's "last seen" is written to the registry, at most:
# its keepalive answers come every --keepalive seconds (15), and a write per
# answer per node would be thousands of transactions a minute on a big hub.
LAST_SEEN_EVERY = 60.0

# A connection that logged in is written online in the registry this long after
# its login, unless its first forward took the node over meanwhile (as every
# device that calls home does at once): then the forward's lease and "online"
# are one write, not two. A reconnect storm makes 10,000 logins in seconds.
ONLINE_WRITE_DELAY = 2.0

# The nodes and pairs on file, read together in the registry thread.
Listed = tuple[NodeUpdate, list[Pair]]


def listing(registry: Registry) -> Listed:
    return NodeUpdate.of(registry.nodes()), registry.pairs()


@define(eq=False)
class LiveSessions:
    """Which connection (and tunnel) carries each node now."""

    registry: Registry
    clock: IReactorTime
    reactor: Any = None
    port_low: int = 49152
    port_high: int = 65535
    public_interface: str = "0.0.0.0"
    # Where forwards listen: the reactor, or a PortKeeper (anything with listenTCP).
    listener: Any = None
    _live: dict[str, NodeTunnel] = field(factory=dict)
    # Forward ports stop accepting while the SSH listener's reserve is short.
    descriptors: DescriptorReserve | None = None
    caps: ForwardCaps = field(factory=ForwardCaps)
    # Ports of the range other programs were found holding, passed over by new leases.
    busy_ports: BusyPorts = field(factory=BusyPorts)
    # Logged-in connections of a node that carry no tunnel (yet): a device
    # that only sends results, a re-register, a check. They take nothing over
    # and are dropped on revocation like tunnels.
    _guests: dict[str, set[Any]] = field(factory=dict)
    # A guest's "online" write waiting for ONLINE_WRITE_DELAY, by connection:
    # the call, the node and the peer.
    _online_writes: dict[Any, tuple[IDelayedCall, str, str]] = field(factory=dict)
    # Bytes through every tunnel since start (the channels dialled add to it).
    traffic: Traffic = field(factory=Traffic)
    # When each connected node's last_seen was last written (clock seconds).
    _seen_written: dict[str, float] = field(factory=dict)
    # Master/clone pairs: told of every tunnel up or down and forward change.
    pairs: LivePairs = field(default=Factory(LivePairs, takes_self=True))
    # This hub's id when it peers with others (hub.cluster): a node the registry
    # says another hub holds now is dropped here (the device moved).
    hub_id: str | None = None
    # Where `get` looks for a node not held here: the tunnel of another live hub
    # through the peer connection (hub.cluster.routing), or None.
    remote: Callable[[str], NodeTunnel | None] | None = None
    # Told after every registry change applied (the relayed ports of other
    # hubs' nodes, hub.cluster.ports), or None.
    on_change: Callable[[], object] | None = None
    # Asked before a node's tunnel binds here: ports this hub relays for the
    # node's previous hub close first (fires once they are free), or None.
    release_relayed: Callable[[str], Any] | None = None
    # Registry calls off the reactor (hub.store.offthread); the hub's RegistryThread.
    calls: RegistryCalls = field(
        default=Factory(lambda self: InlineCalls(self.registry), takes_self=True))
    # How many registry listings were applied (`enforce`): a login may reuse what
    # was read for it before only if none was applied since (DeviceKeyChecker).
    applied: int = 0

    def _online(self, node: str, conn: Any, peer: str, take: bool = True,
                write: bool = True) -> None:
        if write:
            self.calls.write(Registry.mark_online, node, peer, take)
        self._seen_written[node.lower()] = self.clock.seconds()
        keepalive = getattr(conn, "keepalive", None)
        if keepalive is not None:
            keepalive.on_answer = lambda: self.seen(node)

    def seen(self, node: str) -> None:
        """`node`'s connection answered: its last_seen moves, written at most
        every LAST_SEEN_EVERY seconds."""
        key, now = node.lower(), self.clock.seconds()
        if now - self._seen_written.get(key, now - LAST_SEEN_EVERY) >= LAST_SEEN_EVERY:
            self._seen_written[key] = now
            self.calls.refresh(Registry.touch, node)

    def join(self, node: str, conn: Any, peer: str) -> None:
        """A connection of `node` logged in; it takes over only once it forwards.
        Without a tunnel the node is online from this connection."""
        key = node.lower()
        self._guests.setdefault(key, set()).add(conn)
        if key not in self._live:
            self._online(node, conn, peer, take=False, write=False)
            self._online_writes[conn] = (self.clock.callLater(
                ONLINE_WRITE_DELAY, self._write_online, conn), node, peer)
            log.info("node {node} online from {peer}", node=node, peer=peer)

    def _write_online(self, conn: Any) -> None:
        """A guest still connected after ONLINE_WRITE_DELAY."""
        _, node, peer = self._online_writes.pop(conn)
        self._guest_online(node, peer)

    def _guest_online(self, node: str, peer: str) -> None:
        """Nothing took the node over: online from a guest connection."""
        if node.lower() not in self._live:
            self.calls.write(Registry.mark_online, node, peer, False)

    def _drop_online_write(self, conn: Any) -> tuple[str, str] | None:
        """The guest's "online" write still waiting, cancelled: its (node, peer)."""
        waiting = self._online_writes.pop(conn, None)
        if waiting is None:
            return None
        call, node, peer = waiting
        call.cancel()
        return node, peer

    def leave(self, node: str, conn: Any) -> None:
        """A connection that never forwarded went away: the node's tunnel, if
        any, is not its own and stays; else the node is offline with its last
        connection."""
        key = node.lower()
        if self._forget_guest(key, conn, gone=True) and key not in self._live \
                and key not in self._guests:
            self.calls.write(Registry.mark_offline, node)
            log.info("node {node} offline", node=node)

    def _forget_guest(self, key: str, conn: Any, gone: bool = False) -> bool:
        """`conn` is no longer a guest of the node: it went away (`gone`), or took
        the node over. A guest gone before its "online" write was made has it made
        now, so that the registry has its address and time whatever follows."""
        pending = self._drop_online_write(conn)
        if pending is not None and gone:
            self._guest_online(*pending)
        guests = self._guests.get(key)
        if guests is None or conn not in guests:
            return False
        guests.discard(conn)
        if not guests:
            del self._guests[key]
        return True

    def attach(self, node: str, conn: Any, peer: str, record: Node | None = None,
               read_at: int | None = None) -> defer.Deferred[NodeTunnel | None]:
        """Make `conn` the node's tunnel, taking over from the one before;
        None if the node is revoked or gone meanwhile. Its record is read off
        the reactor first, unless `record` is the node as read when `applied`
        was `read_at` and no listing was applied since (the login's read: a
        revocation or an approval applied since is read again)."""
        if record is not None and read_at == self.applied:
            return defer.maybeDeferred(self._attach, node, conn, peer, record)
        return self._node(node).addCallback(
            lambda record: self._attach(node, conn, peer, record))

    def _attach(self, node: str, conn: Any, peer: str, record: Node | None) -> NodeTunnel | None:
        key = node.lower()
        if record is None or record.state == "revoked":
            log.info("node {node}: forward refused, the node is {state}", node=node,
                     state="removed" if record is None else record.state)
            return None
        was_guest = self._forget_guest(key, conn)
        old = self._live.get(key)
        tunnel = NodeTunnel(self, node, conn, record.public, attached_as=record)
        self._live[key] = tunnel
        if self.release_relayed is not None:
            tunnel.requests.wait_for(self.release_relayed(node))
        if old is not None and old.conn is not conn:
            log.info("node {node} reconnected from {peer}: closing its old session",
                     node=node, peer=peer)
            tunnel.requests.wait_for(old.close())
            close_connection(old.conn, self.clock, "superseded by a new connection of this node")
        if was_guest and old is None:
            # Online from this connection since its login (`join`): taking the node
            # over is written with its first forward's lease, one write for both
            # (the tunnel's `online_from` until then).
            self._online(node, conn, peer, write=False)
            tunnel.online_from = peer
        else:  # a takeover: the registry names the new connection at once
            self._online(node, conn, peer)
        # A connection that logged in as a guest said "online" then (`join`).
        (log.debug if was_guest and old is None else log.info)(
            "node {node} online from {peer}", node=node, peer=peer)
        self.pairs.known({key: record.state})
        self.pairs.node_changed(node)
        return tunnel

    def _node(self, node: str) -> defer.Deferred[Node | None]:
        def removed(f: Failure) -> None:
            f.trap(NotFound)

        return self.calls.call(Registry.node, node).addErrback(removed)

    def cap_refusal(self, node: str, live: int, service: str,
                    record: Node | None = None) -> defer.Deferred[str | None]:
        """Why `node`, holding `live` forwards, may not forward `service` now:
        its state is read now (an approval counts at once), unless `record` is
        the node as read just before (the attach of the tunnel's first forward)."""
        def refusal(record: Node | None) -> str | None:
            if record is None:
                return "the node was removed"
            return self.caps.refusal(record.state, live, record.forwards, service)

        read = self._node(node) if record is None else defer.succeed(record)
        return read.addCallback(refusal)

    def detach(self, tunnel: NodeTunnel) -> None:
        key = tunnel.node.lower()
        tunnel.close()
        if self._live.get(key) is tunnel:
            del self._live[key]
            self.calls.write(Registry.mark_offline, tunnel.node)
            log.info("node {node} offline", node=tunnel.node)
            self.pairs.node_changed(tunnel.node)

    def forwards_changed(self, node: str) -> None:
        """A forward of `node`'s tunnel was added or cancelled."""
        self.pairs.node_changed(node)

    def drop_all(self, why: str) -> None:
        """Close every live session (their listeners are gone); devices call back."""
        live, self._live = self._live, {}
        self.calls.write(Registry.mark_offline, *live)  # one transaction, not one per node
        for tunnel in live.values():
            tunnel.close()
            close_connection(tunnel.conn, self.clock, f"hub error: {why}")
        self.pairs.reload()

    def port_lost(self, port: int) -> None:
        """A forward's listener is gone (the port keeper could not take it): drop
        that node's connection, so that the device calls back and binds again."""
        for tunnel in self._live.values():
            if any(f.port == port for f in tunnel.table):
                close_connection(tunnel.conn, self.clock,
                                 f"hub error: the listener of port {port} was lost")
                return

    def get(self, node: str) -> NodeTunnel | None:
        """The node's tunnel: held here, else (peering) through the hub holding it."""
        tunnel = self._live.get(node.lower())
        if tunnel is None and self.remote is not None:
            return self.remote(node)
        return tunnel

    def local(self, node: str) -> NodeTunnel | None:
        """The node's tunnel if this hub holds it (what a peer's dial may use)."""
        return self._live.get(node.lower())

    def online(self) -> list[str]:
        return sorted(self._live)

    def tunnels(self) -> list[NodeTunnel]:
        """The live tunnels now (for metrics: read, never changed)."""
        return list(self._live.values())

    def enforce(self, listed: Listed | None = None) -> defer.Deferred[None]:
        """Apply registry changes: drop revoked or removed nodes, toggle public access.
        `listed` is the registry's nodes and pairs, read off the reactor (now if None)."""
        read = self.calls.call(listing) if listed is None else defer.succeed(listed)

        def apply(listed: Listed) -> None:
            self.applied += 1
            update, pairs = listed
            self.pairs.known({n.name.lower(): n.state for n in update.changed})
            try:
                self._enforce(update)
            finally:
                self.pairs.reload(pairs)  # pairs added or deleted, access switched, revoked
                if self.on_change is not None:
                    self.on_change()

        return read.addCallback(apply)

    def _enforce(self, update: NodeUpdate) -> None:
        if not self._live and not self._guests:
            return
        nodes = update.nodes
        if update.whole:  # nodes may have gone: everything held is looked at
            guests, live = list(self._guests), list(self._live)
        else:  # only the changed nodes held here
            changed = [n.name.lower() for n in update.changed]
            guests = [k for k in changed if k in self._guests]
            live = [k for k in changed if k in self._live]
        for key in guests:
            self._enforce_guests(key, nodes.get(key))
        for key in live:
            self._enforce_tunnel(key, nodes.get(key))

    def _enforce_guests(self, key: str, node: Node | None) -> None:
        """Drop the connections without a tunnel of a node revoked or removed."""
        if node is not None and node.state != "revoked":
            return
        guests = self._guests.pop(key)
        for conn in guests:  # never written online now
            self._drop_online_write(conn)
        state = "removed" if node is None else node.state
        log.info("node {node} {state}: dropping {n} connection(s) without a tunnel",
                 node=key, state=state, n=len(guests))
        if state == "revoked" and key not in self._live:
            self.calls.write(Registry.mark_offline, key)
        for conn in guests:
            close_connection(conn, self.clock, f"node {key} was {state} on the hub")

    def _enforce_tunnel(self, key: str, node: Node | None) -> None:
        """Drop the tunnel of a node revoked, removed or moved to another hub;
        else follow its public access."""
        tunnel = self._live[key]
        if node is not None and self._moved(node.hub):
            log.info("node {node} reconnected to hub {hub}: closing its old session here",
                     node=key, hub=node.hub)
            del self._live[key]
            tunnel.close()
            close_connection(tunnel.conn, self.clock,
                             f"superseded by a new connection of this node to hub {node.hub}")
            return
        state = node.state if node is not None else "removed"
        if node is None or state == "revoked":
            log.info("node {node} {state}: dropping its live session", node=key, state=state)
            del self._live[key]
            tunnel.close()
            if state == "revoked":
                self.calls.write(Registry.mark_offline, key)
            close_connection(tunnel.conn, self.clock, f"node {key} was {state} on the hub")
        else:
            tunnel.set_public(node.public)

    def _moved(self, hub: str | None) -> bool:
        """Whether a node this hub holds is now claimed by another hub."""
        return self.hub_id is not None and hub is not None and hub != self.hub_id
