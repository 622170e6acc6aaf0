"""A node held by another hub, reached through the peer connection to that hub.

`RemoteTunnel` has the surface callers of `LiveSessions.get` use (node, table,
public, interface, conn, dial): its `dial` opens the caller's channel as
`dial@callhomehub` on the peer connection instead of `forwarded-tcpip` on the
device's connection; the holding hub dials its own tunnel and relays. Its
table holds the node's live forwards as the registry records them (which
services are up; the device's bind strings are the holding hub's business).
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.conch.ssh import connection
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.cluster.dialwire import DIAL, DialRequest, pack_dial
from hub.cluster.peerclient import PeerLinks
from hub.cluster.view import FleetView
from hub.rules.cluster import is_live
from hub.ssh.connection import ChannelRefused
from hub.tunnel.dial import Target
from hub.tunnel.forwards import Forward
from hub.tunnel.live import LOOPBACK, D, NodeTunnel
from hub.tunnel.sessions import LiveSessions

log = Logger()


@define(eq=False)
class RemoteTunnel(NodeTunnel):
    """The tunnel of `node`, held by hub `hub`, through the peer connection."""

    hub: str = ""
    links: PeerLinks | None = None

    @property
    def io_group(self) -> Any:
        # Not connected yet: the peer connection's transport brings its own group.
        return None if self.conn is None else self.conn.transport.ioGroup

    def dial(self, target: Target, channel: D, origin: tuple[str | bytes, int] = (LOOPBACK, 0)
             ) -> defer.Deferred[D]:
        opened = self._watch(channel, target)
        host, port = origin
        request = DialRequest(self.node, target,
                              host.decode("utf-8", "replace") if isinstance(host, bytes) else host,
                              port)
        assert self.links is not None

        def open_on(conn: Any) -> None:
            self.conn = conn
            channel.name = DIAL  # type: ignore[attr-defined]
            conn.openChannel(channel, pack_dial(request))

        def unreachable(f: Failure) -> None:
            channel.openFailed(ChannelRefused(
                connection.OPEN_CONNECT_FAILED,
                f"node {self.node} is on hub {self.hub}, which is unreachable: "
                f"{f.getErrorMessage()}"))

        self.links.connection(self.hub).addCallbacks(open_on, unreachable)
        return opened


@define(eq=False)
class Routes:
    """Where `LiveSessions.get` finds a node this hub does not hold: answered from
    the fleet as last read (`FleetView`), so `get` stays synchronous and reads
    nothing on the reactor."""

    view: FleetView
    sessions: LiveSessions
    links: PeerLinks
    hub_id: str

    def remote(self, node: str) -> NodeTunnel | None:
        """The node's tunnel on the live hub holding it, or None."""
        hub = self.view.holder(node)
        if hub is None or hub == self.hub_id:
            return None
        if not self.is_live(hub):
            return None
        record = self.view.node(node)
        if record is None:
            return None
        tunnel = RemoteTunnel(self.sessions, record.name, self.links.current(hub), record.public,
                              hub=hub, links=self.links)
        for service in sorted(record.live):
            # Keyed by service: the device's bind strings are the holding hub's.
            tunnel.table.add(Forward(service, service.encode(), 0, record.forwards[service]))
        return tunnel

    def is_live(self, hub: str) -> bool:
        row = self.view.hub(hub)
        return row is not None and is_live(row.heartbeat, self.sessions.clock.seconds())
