"""Live device tunnels: one per node, their forwards, takeover and revocation.

A node's `tcpip-forward` requests become listeners on the hub's own ports
(leased in the registry, the same port whenever the node asks for the same
service again). Connections to a listener are piped into `forwarded-tcpip`
channels on the node's SSH connection. A node that connects again takes over
at once: the old connection is closed and its listeners released before the
new connection binds the same ports. A node revoked or removed through the CLI
is dropped when the hub notices the registry change.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from attrs import define, field
from twisted.conch.ssh import common, transport
from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hub.errors import NotFound, PortsExhausted
from hub.rules.ports import service_name
from hub.store.registry import Registry
from hub.tunnel.splice import SpliceChannel, TCPEnd

log = Logger()

# How long a connection we closed may take to flush its disconnect message.
CLOSE_GRACE = 5.0
LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS_PER_NODE = 1024
# Attempts to find a port nobody else on the machine holds.
BIND_ATTEMPTS = 256


def close_connection(conn: Any, clock: IReactorTime, why: str) -> None:
    """Tell the peer why, then make sure the TCP connection really goes away."""
    ssh_transport = conn.transport
    tcp = ssh_transport.transport if ssh_transport is not None else None
    if tcp is None or getattr(tcp, "disconnected", False):
        return
    ssh_transport.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, why.encode())
    # A dead peer never drains what we wrote; do not wait for TCP to time out.
    clock.callLater(CLOSE_GRACE, lambda: None if tcp.disconnected else tcp.abortConnection())


@define(eq=False)
class Forward:
    service: str
    bind: bytes          # the bind string exactly as the device sent it
    channel_port: int    # the port put in forwarded-tcpip (what the device asked for)
    port: int            # the hub's real port
    listener: Any = None
    stopping: defer.Deferred[Any] | None = None  # the last listener's close, until done

    def stop(self) -> defer.Deferred[None]:
        """Close the listener; fires once the port is free (also for a close under way)."""
        if self.listener is not None:
            listener, self.listener = self.listener, None
            self.stopping = defer.maybeDeferred(listener.stopListening)
        pending = self.stopping
        if pending is None or pending.called:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()

        def relay(result: Any) -> Any:
            done.callback(None)
            return result

        pending.addBoth(relay)
        return done


class ForwardListener(protocol.Factory):
    """Accepts connections on a node's port and pipes each into the tunnel."""

    noisy = False

    def __init__(self, tunnel: NodeTunnel, forward: Forward) -> None:
        self.tunnel = tunnel
        self.forward = forward

    def buildProtocol(self, addr: Any) -> TCPEnd | None:
        if self.tunnel.closed:
            return None  # accepted just before the listener closed (port keeper)
        if len(self.tunnel.pipes) >= MAX_CONNECTIONS_PER_NODE:
            log.warn("node {node}: {n} forwarded connections open, refusing another",
                     node=self.tunnel.node, n=len(self.tunnel.pipes))
            return None
        end = TCPEnd()
        end.on_connect = lambda: self.tunnel.open_pipe(self.forward, end, addr)
        return end


@define(eq=False)
class NodeTunnel:
    """The forwards of one live session of a node."""

    sessions: LiveSessions
    node: str
    conn: Any
    public: bool
    # Fires when the previous session's listeners are released.
    ready: defer.Deferred[None] = field(factory=lambda: defer.succeed(None))
    forwards: dict[tuple[bytes, int], Forward] = field(factory=dict)
    pipes: set[SpliceChannel] = field(factory=set)
    closed: bool = False

    @property
    def interface(self) -> str:
        return self.sessions.public_interface if self.public else LOOPBACK

    def request_forward(self, bind: bytes, port: int) -> defer.Deferred[Any]:
        service = service_name(bind.decode("utf-8", "replace"), port)
        return self.ready.addCallback(lambda _: self._forward(bind, port, service))

    def _forward(self, bind: bytes, port: int, service: str) -> Any:
        if self.closed:
            return 0
        key = (bind, port)
        if key in self.forwards:
            return self._reply(self.forwards[key], port)
        same = next((f for f in self.forwards.values() if f.service == service), None)
        if same is not None:
            # Its lease is the port the other forward holds: refuse rather than
            # move the node's port or share one listener between two targets.
            log.warn("node {node}: service {service} is already forwarded on port {port}; "
                     "refusing a second forward of it", node=self.node, service=service,
                     port=same.port)
            return 0
        avoid: set[int] = set()
        for _ in range(BIND_ATTEMPTS):
            try:
                real, new = self.sessions.registry.lease(
                    self.node, service, self.sessions.port_low, self.sessions.port_high, avoid)
            except PortsExhausted as e:
                log.error("node {node}: forward {service} refused: {why}", node=self.node,
                          service=service, why=str(e))
                return 0
            forward = Forward(service, bind, port if port else real, real)
            try:
                self._listen(forward)
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) != errno.EADDRINUSE:
                    log.error("node {node}: cannot listen on {port}: {why}", node=self.node,
                              port=real, why=str(e.socketError))
                    return 0
                if not avoid:
                    log.warn("node {node}: port {port} is in use by another program; "
                             "choosing another", node=self.node, port=real)
                avoid.add(real)
                continue
            self.forwards[key] = forward
            self.sessions.registry.set_lease_active(self.node, service, True)
            log.info("node {node}: forward {service} on {iface}:{port}{new}", node=self.node,
                     service=service, iface=self.interface, port=real,
                     new=" (new lease)" if new else "")
            return self._reply(forward, port)
        log.error("node {node}: no usable port for {service}", node=self.node, service=service)
        return 0

    @staticmethod
    def _reply(forward: Forward, requested: int) -> Any:
        # Port 0 is answered with the allocated port (OpenSSH prints it);
        # a fixed port is a virtual service number and needs no data.
        return (1, struct.pack(">L", forward.port)) if requested == 0 else 1

    def _listen(self, forward: Forward) -> None:
        forward.listener = (self.sessions.listener or self.sessions.reactor).listenTCP(
            forward.port, ForwardListener(self, forward), interface=self.interface)

    def cancel_forward(self, bind: bytes, port: int) -> Any:
        key = (bind, port)
        if key not in self.forwards:
            # OpenSSH cancels a port-0 forward by the port it was allocated.
            key = next((k for k, f in self.forwards.items()
                        if k[0] == bind and k[1] == 0 and f.port == port), key)
        forward = self.forwards.pop(key, None)
        if forward is None:
            return 0
        self.sessions.registry.set_lease_active(self.node, forward.service, False)
        log.info("node {node}: forward {service} cancelled", node=self.node,
                 service=forward.service)
        return forward.stop().addCallback(lambda _: 1)

    def open_pipe(self, forward: Forward, end: TCPEnd, addr: Any) -> None:
        chan = SpliceChannel(end, b"forwarded-tcpip",
                             on_close=lambda i, o: self.pipes.discard(chan))
        self.pipes.add(chan)
        self.conn.openChannel(chan, self.channel_data(
            forward, getattr(addr, "host", "0.0.0.0"), getattr(addr, "port", 0)))

    def service_forward(self, service: str) -> Forward | None:
        """The live forward of `service` (case-insensitive), if the node has one."""
        return next((f for f in self.forwards.values() if f.service == service.lower()), None)

    @staticmethod
    def channel_data(forward: Forward, origin: str = "127.0.0.1", origin_port: int = 0
                     ) -> bytes:
        """forwarded-tcpip open data: the device's own bind string and port, as
        OpenSSH checks them against the forwards it asked for."""
        return (common.NS(forward.bind) + struct.pack(">L", forward.channel_port)
                + common.NS(origin.encode()) + struct.pack(">L", origin_port))

    def set_public(self, public: bool) -> defer.Deferred[None]:
        """Rebind every forward on the public interface or back on loopback."""
        if public == self.public or self.closed:
            return defer.succeed(None)
        self.public = public

        def rebind(key: tuple[bytes, int], forward: Forward) -> defer.Deferred[None]:
            def listen(_: object) -> None:
                # The tunnel may have closed, or the forward been cancelled, meanwhile.
                if self.closed or self.forwards.get(key) is not forward:
                    return
                try:
                    self._listen(forward)
                except CannotListenError as e:
                    log.error("node {node}: cannot rebind {port} on {iface}: {why}",
                              node=self.node, port=forward.port, iface=self.interface,
                              why=str(e.socketError))
            return forward.stop().addCallback(listen)

        log.info("node {node}: ports now on {iface}", node=self.node, iface=self.interface)
        return defer.gatherResults([rebind(k, f) for k, f in list(self.forwards.items())]
                                   ).addCallback(lambda _: None)

    def close(self) -> defer.Deferred[None]:
        """Release every listener; the leases stay with the node."""
        self.closed = True
        stops = [f.stop() for f in self.forwards.values()]
        self.forwards.clear()
        return defer.gatherResults(stops).addCallback(lambda _: None)


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

    def attach(self, node: str, conn: Any, peer: str) -> NodeTunnel:
        key = node.lower()
        old = self._live.get(key)
        public = self._node_public(node)
        tunnel = NodeTunnel(self, node, conn, public)
        self._live[key] = tunnel
        if old is not None and old.conn is not conn:
            log.info("node {node} reconnected from {peer}: closing its old session",
                     node=node, peer=peer)
            tunnel.ready = old.close()
            close_connection(old.conn, self.clock, "superseded by a new connection of this node")
        self.registry.mark_online(node, peer)
        log.info("node {node} online from {peer}", node=node, peer=peer)
        return tunnel

    def _node_public(self, node: str) -> bool:
        try:
            return self.registry.node(node).public
        except NotFound:
            return False

    def detach(self, tunnel: NodeTunnel) -> None:
        key = tunnel.node.lower()
        tunnel.close()
        if self._live.get(key) is tunnel:
            del self._live[key]
            self.registry.mark_offline(tunnel.node)
            log.info("node {node} offline", node=tunnel.node)

    def drop_all(self, why: str) -> None:
        """Close every live session (their listeners are gone); devices call back."""
        live, self._live = self._live, {}
        self.registry.mark_offline(*live)  # one transaction, not one per node
        for tunnel in live.values():
            tunnel.close()
            close_connection(tunnel.conn, self.clock, f"hub error: {why}")

    def port_lost(self, port: int) -> None:
        """A forward's listener is gone (the port keeper could not take it): drop
        that node's connection, so that the device calls back and binds again."""
        for tunnel in self._live.values():
            if any(f.port == port for f in tunnel.forwards.values()):
                close_connection(tunnel.conn, self.clock,
                                 f"hub error: the listener of port {port} was lost")
                return

    def get(self, node: str) -> NodeTunnel | None:
        return self._live.get(node.lower())

    def online(self) -> list[str]:
        return sorted(self._live)

    def enforce(self) -> None:
        """Apply registry changes: drop revoked or removed nodes, toggle public access."""
        if not self._live:
            return
        nodes = {n.name.lower(): n for n in self.registry.nodes()}
        for key, tunnel in list(self._live.items()):
            node = nodes.get(key)
            state = node.state if node is not None else "removed"
            if node is None or state == "revoked":
                log.info("node {node} {state}: dropping its live session", node=key, state=state)
                del self._live[key]
                tunnel.close()
                if state == "revoked":
                    self.registry.mark_offline(key)
                close_connection(tunnel.conn, self.clock, f"node {key} was {state} on the hub")
            else:
                tunnel.set_public(node.public)
