"""Live device tunnels: one per node, their forwards, takeover and revocation.

A node's `tcpip-forward` requests become listeners on the hub's own ports
(leased in the registry, the same port whenever the node asks for the same
service again). Connections to a listener are piped into `forwarded-tcpip`
channels on the node's SSH connection; `NodeTunnel.dial` is the one way into
a device for every part of the hub (port listeners, jump host, gateway). The
forward decisions are `ForwardTable`'s; a session carries its requests out one
by one, in order (`RequestQueue`). A node's connection that asks for a
forward takes over: the old connection is closed and its listeners released
before the new connection binds the same ports. A login that forwards nothing
(a re-register, a check) takes nothing over. A node revoked or removed through
the CLI is dropped, with every connection it has, when the hub notices the
registry change.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define, field
from twisted.conch.ssh import transport
from twisted.internet import defer, protocol, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.errors import PortsExhausted
from hub.ssh.connection import ChannelRefused
from hub.store.registry import Node, Registry
from hub.tunnel.accept import listen_forward
from hub.tunnel.dial import DeviceRefused, Dialled, OpenNotice, Target, not_forwarded
from hub.tunnel.fifo import RequestQueue
from hub.tunnel.forwards import Duplicate, Forward, ForwardTable, Lease, Refused
from hub.tunnel.splice import SpliceChannel, TCPEnd

if TYPE_CHECKING:
    from hub.tunnel.sessions import LiveSessions

log = Logger()

# How long a connection we closed may take to flush its disconnect message.
CLOSE_GRACE = 5.0
LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS_PER_NODE = 1024
# Attempts to find a port nobody else on the machine holds.
BIND_ATTEMPTS = 256
# A node's own (kept) port found in use is tried again every KEPT_PORT_RETRY
# seconds for KEPT_PORT_WAIT before the lease moves to another port.
KEPT_PORT_WAIT = 5.0
KEPT_PORT_RETRY = 0.5

D = TypeVar("D", bound=Dialled)


def close_connection(conn: Any, clock: IReactorTime, why: str) -> None:
    """Tell the peer why, then make sure the TCP connection really goes away."""
    if conn.transport is not None:
        conn.transport.disconnectWithin(CLOSE_GRACE, clock, transport.DISCONNECT_BY_APPLICATION,
                                        why.encode())


@define(eq=False)
class PortListener:
    """The listener of one forward, and its close while one is under way."""

    port: Any = None
    stopping: defer.Deferred[Any] | None = None

    def stop(self) -> defer.Deferred[None]:
        """Close the listener; fires once the port is free (also for a close under way)."""
        if self.port is not None:
            port, self.port = self.port, None
            self.stopping = defer.maybeDeferred(port.stopListening)
        pending = self.stopping
        if pending is None or pending.called:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()

        def relay(result: Any) -> Any:
            done.callback(None)
            return result

        pending.addBoth(relay)
        return done


class TunnelSplice(OpenNotice, SpliceChannel):
    """A per-device port's connection piped into the tunnel (see `NodeTunnel.dial`)."""

    def channelOpen(self, specificData: bytes) -> None:
        SpliceChannel.channelOpen(self, specificData)
        self.notify_open()

    def openFailed(self, reason: Any) -> None:
        SpliceChannel.openFailed(self, reason)  # logs it, closes the TCP side
        self.notify_failed(reason)


class ForwardListener(protocol.Factory):
    """Accepts connections on a node's port and pipes each into the tunnel."""

    noisy = False

    def __init__(self, tunnel: NodeTunnel, forward: Forward) -> None:
        self.tunnel = tunnel
        self.forward = forward
        self._what = f"port {forward.port}"  # for the descriptor reserve's log lines

    def buildProtocol(self, addr: Any) -> TCPEnd | None:
        if self.tunnel.closed:
            return None  # accepted just before the listener closed (port keeper)
        reserve = self.tunnel.sessions.descriptors
        if reserve is not None and not reserve.allows(self._what):
            return None
        if len(self.tunnel.pipes) >= MAX_CONNECTIONS_PER_NODE:
            log.warn("node {node}: {n} forwarded connections open, refusing another",
                     node=self.tunnel.node, n=len(self.tunnel.pipes))
            return None
        end = TCPEnd()
        end.on_connect = lambda: self.tunnel.open_pipe(self.forward, end, addr)
        return end


@define(eq=False)
class NodeTunnel:
    """The forwards of one live session of a node, and the way into the device."""

    sessions: LiveSessions
    node: str
    conn: Any
    public: bool
    table: ForwardTable = field(factory=ForwardTable)
    listeners: dict[Forward, PortListener] = field(factory=dict)
    # Forward and cancel requests, in order; the first wait for the previous
    # session of the node to release its listeners.
    requests: RequestQueue = field(factory=RequestQueue)
    pipes: set[SpliceChannel] = field(factory=set)
    closed: bool = False
    # The node as `attach` read it, until the first forward's caps are checked
    # with it: a login reads the node once, not twice (hub.tunnel.sessions).
    attached_as: Node | None = None
    # The peer the node is online from, not written yet: its first forward
    # request writes it (with the lease it made active, in one transaction).
    online_from: str | None = None

    @property
    def interface(self) -> str:
        return self.sessions.public_interface if self.public else LOOPBACK

    @property
    def io_group(self) -> Any:
        """The IOGroup of the transport carrying channels into the device."""
        return self.conn.transport.ioGroup

    # -- the way into the device ---------------------------------------------

    def dial(self, target: Target, channel: D, origin: tuple[str | bytes, int] = (LOOPBACK, 0)
             ) -> defer.Deferred[D]:
        """Open `channel` as a forwarded-tcpip channel to the device's `target`:
        a service name ("ssh", "port-8080"), or a port as an operator asks for it.

        `origin` is the originator address and port put in the open. The
        Deferred fires with the channel once the device confirms it; it fails
        with ChannelRefused if the node does not forward `target`, or with
        DeviceRefused if the device refuses. The channel hears either outcome
        through its own channelOpen / openFailed.
        """
        forward = self.table.lookup(target)
        opened = self._watch(channel, target)
        if forward is None:
            channel.openFailed(not_forwarded(self.node, target))
        else:
            host, port = origin
            self.conn.openChannel(channel, forward.open_data(
                host.encode() if isinstance(host, str) else host, port))
        return opened

    def _watch(self, channel: D, target: Target) -> defer.Deferred[D]:
        """`channel.opened`, with a device's refusal in words; the channel's bytes
        count in the hub's traffic."""
        opened: defer.Deferred[D] = channel.opened
        if hasattr(channel, "traffic"):  # splice, relay, in-process: they count their bytes
            channel.traffic = self.sessions.traffic

        def refused(f: Failure) -> Failure:
            if isinstance(f.value, ChannelRefused):
                return f
            return Failure(DeviceRefused(self.node, target, f.value))

        return opened.addErrback(refused)

    def open_pipe(self, forward: Forward, end: TCPEnd, addr: Any) -> None:
        chan = TunnelSplice(end, b"forwarded-tcpip",
                            on_close=lambda i, o: self.pipes.discard(chan))
        self.pipes.add(chan)
        host, port = getattr(addr, "host", "0.0.0.0"), getattr(addr, "port", 0)
        if self.table.holds(forward):
            # The listener's own forward, still live: what `dial` would find by
            # its service, opened without dial's Deferreds (nobody waits on
            # them; the splice hears the outcome itself).
            chan.traffic = self.sessions.traffic
            self.conn.openChannel(chan, forward.open_data(
                host.encode() if isinstance(host, str) else host, port))
            return
        # Cancelled or replaced meanwhile: dial finds the service's forward, or
        # refuses; a refusal was logged by the splice, which closed its TCP side.
        self.dial(forward.service, chan, (host, port)).addErrback(
            lambda f: f.trap(ChannelRefused))

    # -- forward requests --------------------------------------------------------

    def request_forward(self, bind: bytes, port: int) -> defer.Deferred[Any]:
        """Carry out `tcpip-forward`; fires with the global request's answer."""
        return self._queue("forward", lambda: self._forward(bind, port)).addCallback(
            self._mark_online)

    def _mark_online(self, answer: Any) -> Any:
        """The node online from this tunnel, if its first forward did not say so
        (refused, or failed) and the tunnel is still the node's."""
        peer, self.online_from = self.online_from, None
        if peer is not None and not self.closed:
            self.sessions.calls.write(Registry.mark_online, self.node, peer, True)
        return answer

    def cancel_forward(self, bind: bytes, port: int) -> defer.Deferred[Any]:
        """Carry out `cancel-tcpip-forward`; fires with the global request's answer."""
        return self._queue("cancel", lambda: self._cancel(bind, port))

    def _queue(self, what: str, request: Callable[[], Any]) -> defer.Deferred[Any]:
        def failed(f: Failure) -> int:
            log.failure("node {node}: {what} request failed", f, node=self.node, what=what)
            return 0

        return self.requests.run(request).addErrback(failed)

    def _forward(self, bind: bytes, port: int) -> Any:
        if self.closed:
            return 0
        decision = self.table.request(bind, port)
        asked = f"{bind.decode('utf-8', 'replace')}:{port}"
        if isinstance(decision, Refused):
            log.warn("node {node}: forward {asked} refused: {why}", node=self.node, asked=asked,
                     why=decision.why)
            return 0
        if isinstance(decision, Duplicate):
            log.warn("node {node}: forward {asked} refused: service {service} is already "
                     "forwarded on port {port}", node=self.node, asked=asked,
                     service=decision.service, port=decision.holder.port)
            return 0
        def decided(why: str | None) -> Any:
            if why is not None:
                log.warn("node {node}: forward {service} refused: {why}", node=self.node,
                         service=decision.service, why=why)
                return 0
            return self._lease_and_listen(decision, set()).addCallback(added)

        def added(forward: Forward | None) -> Any:
            if forward is None:
                return 0
            self.table.add(forward)
            peer, self.online_from = self.online_from, None
            if peer is not None:  # the tunnel's first forward: online with it
                self.sessions.calls.write(Registry.mark_online, self.node, peer, True,
                                          forward.service)
            else:
                self.sessions.calls.write(Registry.set_lease_active, self.node,
                                          forward.service, True)
            self.sessions.forwards_changed(self.node)
            return forward.reply()

        def failed(f: Failure) -> int:
            log.error("node {node}: forward {service} refused: the registry failed: {why}",
                      node=self.node, service=decision.service,
                      why=f.getErrorMessage() or f.type.__name__)  # type: ignore[union-attr]
            return 0

        # The node's state and its lease are read off the reactor; the request
        # queue holds the node's next request until this one is answered.
        record, self.attached_as = self.attached_as, None
        return self.sessions.cap_refusal(self.node, len(self.table), decision.service,
                                         record).addCallback(decided).addErrback(failed)

    def _lease_and_listen(self, lease: Lease, avoid: set[int],
                          attempt: int = 0) -> defer.Deferred[Forward | None]:
        """A leased port for the new forward, listened on; a port another program
        holds is avoided and another leased."""
        service = lease.service
        if attempt >= BIND_ATTEMPTS:
            log.error("node {node}: no usable port for {service}", node=self.node,
                      service=service)
            return defer.succeed(None)

        def exhausted(f: Failure) -> None:
            f.trap(PortsExhausted)
            log.error("node {node}: forward {service} refused: {why}", node=self.node,
                      service=service, why=f.getErrorMessage())

        def leased(got: tuple[int, bool], waited: float = 0.0
                   ) -> Forward | defer.Deferred[Forward | None] | None:
            real, new = got
            if self.closed:  # the session ended while the lease was recorded
                return None
            forward = lease.forward(real)
            try:
                self._listen(forward)
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) != errno.EADDRINUSE:
                    log.error("node {node}: cannot listen on {port}: {why}", node=self.node,
                              port=real, why=str(e.socketError))
                    return None
                if not new and waited < KEPT_PORT_WAIT:
                    # The node's own port: what held its last connection (another
                    # worker or hub as it stops, its port keeper) may not have let
                    # it go yet. Moving the lease now would move it for good.
                    if not waited:
                        log.info("node {node}: its port {port} is still in use; waiting up "
                                 "to {wait:g} s for it", node=self.node, port=real,
                                 wait=KEPT_PORT_WAIT)
                    # (deferLater chains the Deferred `leased` may return; its stub does not say so)
                    return task.deferLater(self.sessions.clock, KEPT_PORT_RETRY,
                                           leased, got,  # type: ignore[arg-type]
                                           waited + KEPT_PORT_RETRY)
                if busy.found(real, self.sessions.clock.seconds()) and not avoid:
                    log.warn("node {node}: port {port} is in use by another program; "
                             "choosing another (new leases pass it over for {minutes:.0f} "
                             "minutes)", node=self.node, port=real,
                             minutes=busy.held_for / 60)
                avoid.add(real)
                return self._lease_and_listen(lease, avoid, attempt + 1)
            log.info("node {node}: forward {service} on {iface}:{port}{new}", node=self.node,
                     service=service, iface=self.interface, port=real,
                     new=" (new lease)" if new else "")
            return forward

        busy = self.sessions.busy_ports
        return self.sessions.calls.call(
            Registry.lease, self.node, service, self.sessions.port_low, self.sessions.port_high,
            frozenset(avoid), busy.recent(self.sessions.clock.seconds())
        ).addCallbacks(leased, exhausted)

    def _listen(self, forward: Forward) -> None:
        port = listen_forward(self.sessions.listener or self.sessions.reactor, forward.port,
                              ForwardListener(self, forward), self.interface)
        self.listeners.setdefault(forward, PortListener()).port = port

    def _cancel(self, bind: bytes, port: int) -> Any:
        forward = self.table.cancel(bind, port)
        if forward is None:
            return 0
        self.sessions.calls.write(Registry.set_lease_active, self.node, forward.service,
                                  False)
        log.info("node {node}: forward {service} cancelled", node=self.node,
                 service=forward.service)
        self.sessions.forwards_changed(self.node)
        return self._release(forward).addCallback(lambda _: 1)

    def _release(self, forward: Forward) -> defer.Deferred[None]:
        """Stop the forward's listener; it is forgotten once the port is free."""
        listener = self.listeners.get(forward)
        if listener is None:
            return defer.succeed(None)

        def forget(_: object) -> None:
            if self.listeners.get(forward) is listener and listener.port is None:
                del self.listeners[forward]

        return listener.stop().addCallback(forget)

    # -- the session -----------------------------------------------------------

    def set_public(self, public: bool) -> defer.Deferred[None]:
        """Rebind every forward on the public interface or back on loopback."""
        if public == self.public or self.closed:
            return defer.succeed(None)
        self.public = public

        def rebind(forward: Forward) -> defer.Deferred[None]:
            def listen(_: object) -> None:
                # The tunnel may have closed, or the forward been cancelled, meanwhile.
                if self.closed or not self.table.holds(forward):
                    return
                try:
                    self._listen(forward)
                except CannotListenError as e:
                    log.error("node {node}: cannot rebind {port} on {iface}: {why}",
                              node=self.node, port=forward.port, iface=self.interface,
                              why=str(e.socketError))
            return self.listeners[forward].stop().addCallback(listen)

        log.info("node {node}: ports now on {iface}", node=self.node, iface=self.interface)
        return defer.gatherResults([rebind(f) for f in self.table if f in self.listeners]
                                   ).addCallback(lambda _: None)

    def close(self) -> defer.Deferred[None]:
        """Release every listener (also those being cancelled); the leases stay
        with the node."""
        self.closed = True
        self.table.clear()
        stops = [listener.stop() for listener in self.listeners.values()]
        self.listeners.clear()
        return defer.gatherResults(stops).addCallback(lambda _: None)
