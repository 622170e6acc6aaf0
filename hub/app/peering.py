"""Wiring of the peer listener, the heartbeat and cross-hub routing (`--peer`).

Without `--peer` nothing here runs: a single hub, as before.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from hub.app.context import Hub
from hub.cluster.heartbeat import HubHeartbeat
from hub.cluster.peerclient import PeerLinks
from hub.cluster.peerserver import build_peer_factory
from hub.cluster.ports import RemotePorts
from hub.cluster.remote import Routes
from hub.cluster.view import FleetView
from hub.rules.cluster import peer_address
from hub.ssh.keys import load_peer_key

log = Logger()




class HeartbeatService(service.Service):
    """Publishes the hub once its peer listener is bound; stops beating on stop."""

    def __init__(self, heartbeat: HubHeartbeat, configured: str | None,
                 view: FleetView, ports: RemotePorts) -> None:
        self.heartbeat = heartbeat
        self.configured = configured
        self.view = view
        self.ports = ports

    def listening(self, port: Any) -> None:
        addr = port.getHost()
        address = peer_address(self.configured, addr.host, addr.port)
        if address is None:  # config.py refused this: a listener on every interface
            raise SystemExit("callhomehub: set [cluster] peer_address")
        self.heartbeat.start(address)
        self.view.refresh()  # the relayed ports follow

    def stopService(self) -> Any:
        self.heartbeat.stop()
        service.Service.stopService(self)
        self.view.on_refresh.clear()  # a read still under way opens no port now
        return self.ports.close()


def add_peering(top: service.MultiService, hub: Hub, reactor: Any,
                listener: Any) -> None:
    """The peer listener (a `ListenerService` class, passed in to keep one
    definition of it), heartbeat and routing, when `--peer` is given."""
    config = hub.config
    if config.peer is None:
        return
    key = load_peer_key(config.keys_dir)
    key_line = key.public().toString("openssh", comment=config.cluster_id.encode()).decode()

    def connect(host: str, port: int, factory: protocol.ClientFactory) -> Any:
        return HostnameEndpoint(reactor, host, port).connect(factory)

    links = PeerLinks(hub.calls, hub.clock, config.cluster_id, key, connect,
                      config.keepalive, config.keepalive_count)
    # Routing and the relayed ports answer from the fleet as last read in the
    # registry thread, read again on each change applied and after each heartbeat.
    view = FleetView(hub.calls, hub.mirror)
    hub.sessions.remote = Routes(view, hub.sessions, links, config.cluster_id).remote
    ports = RemotePorts(view, hub.sessions, config.cluster_id,
                        (hub.sessions.listener or reactor).listenTCP, config.worker_group)
    view.on_refresh.append(ports.refresh)
    hub.fleet = view  # applied from the same read as each change (Hub.apply)
    hub.sessions.release_relayed = ports.release
    beat = HubHeartbeat(hub.calls, hub.clock, config.cluster_id, key_line,
                        on_beat=view.refresh)
    heartbeat = HeartbeatService(beat, config.peer_address, view, ports)
    heartbeat.setServiceParent(top)
    factory = build_peer_factory(hub.calls, hub.sessions, key, hub.clock, config.limits,
                                 config.keepalive, config.keepalive_count)
    listener("peer", config.peer, factory, reactor,
             on_listening=heartbeat.listening).setServiceParent(top)
    log.info("hub {hub}: peering on {endpoint}", hub=config.cluster_id, endpoint=config.peer)
