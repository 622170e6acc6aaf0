"""Per-device ports of nodes held by other hubs, answered here too.

Each hub listens on the leased ports of the nodes other live hubs hold (on
loopback, or the public interface while `access NODE on`) and relays each
connection through the peer connection to the holding hub, so a device's
port answers on every hub. A port this machine has bound already (the holding
hub itself, when hubs share a machine) is expected: logged at debug, skipped.
When a node's tunnel comes up on this hub its relayed ports close first, and
the tunnel binds them itself.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from hub.cluster.view import FleetView
from hub.rules.cluster import is_live, is_sibling
from hub.ssh.connection import ChannelRefused
from hub.tunnel.live import LOOPBACK, PortListener, TunnelSplice
from hub.tunnel.sessions import LiveSessions
from hub.tunnel.splice import TCPEnd

log = Logger()

# One relayed port: (node, service, port, interface).
Relayed = tuple[str, str, int, str]


class RelayedPortFactory(protocol.Factory):
    """Accepts on another hub's node port and dials the node through that hub."""

    noisy = False

    def __init__(self, ports: RemotePorts, node: str, service: str) -> None:
        self.ports, self.node, self.service = ports, node, service

    def buildProtocol(self, addr: Any) -> TCPEnd | None:
        end = TCPEnd()
        end.on_connect = lambda: self.ports.relay(self.node, self.service, end, addr)
        return end


@define(eq=False)
class RemotePorts:
    # The fleet as last read in the registry thread (refreshed on each change
    # and heartbeat): `refresh` reads nothing on the reactor.
    view: FleetView
    sessions: LiveSessions
    hub_id: str
    # Binds a port: listenTCP(port, factory, interface=...) of the reactor.
    listen: Callable[..., Any]
    # With --workers: this machine's workers (`[cluster] id`), which bind their
    # nodes' ports here themselves; a relay of one would race its owner for it.
    worker_group: str | None = None
    _open: dict[Relayed, PortListener] = field(factory=dict)

    def wanted(self) -> set[Relayed]:
        """The live ports of nodes held by other live hubs."""
        now = self.sessions.clock.seconds()
        live_hubs = {h.id for h in self.view.hubs()
                     if h.id != self.hub_id and is_live(h.heartbeat, now)
                     and not is_sibling(self.worker_group, h.id)}
        if not live_hubs:  # a single hub, or only this machine's workers: nothing to relay
            return set()
        interface = self.sessions.public_interface
        return {(n.name, service, n.forwards[service], interface if n.public else LOOPBACK)
                for n in self.view.nodes()
                if n.online and n.hub in live_hubs and self.sessions.local(n.name) is None
                for service in n.live}

    def refresh(self) -> None:
        """Listen on the ports wanted now, close the others."""
        wanted = self.wanted()
        for key in set(self._open) - wanted:
            self._open.pop(key).stop()
        for key in sorted(wanted - set(self._open)):
            node, service, port, interface = key
            try:
                listening = self.listen(port, RelayedPortFactory(self, node, service),
                                        interface=interface)
            except CannotListenError as e:
                emit = (log.debug if getattr(e.socketError, "errno", None) == errno.EADDRINUSE
                        else log.warn)
                emit("node {node} {service}: port {port} not relayed here: {why}", node=node,
                     service=service, port=port, why=str(e.socketError))
                continue
            log.info("node {node} {service}: port {iface}:{port} relayed to its hub",
                     node=node, service=service, iface=interface, port=port)
            self._open[key] = PortListener(listening)

    def release(self, node: str) -> defer.Deferred[None]:
        """Close `node`'s relayed ports (its tunnel is coming up here); fires once free."""
        mine = [key for key in self._open if key[0].lower() == node.lower()]
        return defer.gatherResults([self._open.pop(key).stop() for key in mine]
                                   ).addCallback(lambda _: None)

    def close(self) -> defer.Deferred[None]:
        stops = [listener.stop() for listener in self._open.values()]
        self._open.clear()
        return defer.gatherResults(stops).addCallback(lambda _: None)

    def relay(self, node: str, service: str, end: TCPEnd, addr: Any) -> None:
        tunnel = self.sessions.get(node)
        if tunnel is None:
            log.info("node {node}: relayed port closed, the node is not held by a live hub",
                     node=node)
            end.transport.loseConnection()
            return
        chan = TunnelSplice(end, b"forwarded-tcpip")
        origin = (getattr(addr, "host", "0.0.0.0"), getattr(addr, "port", 0))
        tunnel.dial(service, chan, origin).addErrback(lambda f: f.trap(ChannelRefused))
