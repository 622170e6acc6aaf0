"""This hub's SSH connections to its peers: one per peer hub, opened on demand.

A connection logs in as this hub's id with its peer key and checks the peer's
host key against the peer key that hub publishes in the registry. It is kept
with keepalives and forgotten when lost; the next dial opens it again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.conch.ssh import keys
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.device_client import DeviceClientTransport, DeviceConnection, DeviceError
from hub.cluster.peerserver import key_blob
from hub.rules.cluster import is_live, split_address
from hub.ssh.connection import Keepalive
from hub.ssh.keys import fingerprint
from hub.store.hubs import HubRow
from hub.store.offthread import RegistryCalls
from hub.store.registry import Registry

log = Logger()

# How long opening a peer connection (TCP, key exchange, login) may take.
CONNECT_TIMEOUT = 10.0


class PeerUnreachable(DeviceError):
    """No connection to the peer hub: dead, unknown, refused or too slow."""


class PeerConnection(DeviceConnection):
    """The connection service to a peer hub, with keepalives."""

    keepalive: Keepalive | None = None
    on_lost: Callable[[], None] | None = None

    def __init__(self, ready: defer.Deferred[DeviceConnection], clock: IReactorTime,
                 interval: float, count: int) -> None:
        DeviceConnection.__init__(self, ready)
        self._clock, self._interval, self._count = clock, interval, count

    def serviceStarted(self) -> None:
        self.keepalive = Keepalive(self, self._clock, self._interval, self._count,
                                   lambda: str(getattr(self.transport, "peer", "?")))
        DeviceConnection.serviceStarted(self)

    def serviceStopped(self) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        DeviceConnection.serviceStopped(self)
        if self.on_lost is not None:
            callback, self.on_lost = self.on_lost, None
            callback()


class PeerClientTransport(DeviceClientTransport):
    """Logs in to a peer hub's listener; its host key must be the published one."""

    def __init__(self, hub_id: str, key: keys.Key, peer_hub: str, published: bytes,
                 ready: defer.Deferred[DeviceConnection], clock: IReactorTime,
                 keepalive: float, keepalive_count: int) -> None:
        DeviceClientTransport.__init__(self, hub_id.encode(), key, None, published, ready, clock)
        self.peer = f"peer hub {peer_hub}"
        self.peer_hub = peer_hub
        self.peer_clock = clock
        self._keepalive = (keepalive, keepalive_count)

    def verifyHostKey(self, hostKey: bytes, fingerprint_: bytes) -> defer.Deferred[bool]:
        self.host_key = hostKey
        if hostKey != self.pinned:
            assert self.pinned is not None
            self.failure = PeerUnreachable(
                f"hub {self.peer_hub} presented host key {fingerprint(hostKey)}, not the peer "
                f"key it publishes ({fingerprint(self.pinned)})")
            return defer.fail(self.failure)
        return defer.succeed(True)

    def connection_service(self) -> DeviceConnection:
        return PeerConnection(self.ready, self.peer_clock, *self._keepalive)

    def login_refused(self, said: str | None = None) -> DeviceError:
        return PeerUnreachable(f"hub {self.peer_hub} refused this hub's login"
                               + (f": {said}" if said else ""))


Connect = Callable[[str, int, protocol.ClientFactory], defer.Deferred[Any]]


@define(eq=False)
class PeerLinks:
    """One SSH connection per peer hub, opened when first needed."""

    # The hubs' published addresses and keys are read in the registry thread.
    calls: RegistryCalls
    clock: IReactorTime
    hub_id: str
    key: keys.Key
    # Opens a TCP connection to host:port with the factory (HostnameEndpoint in
    # the service wiring; an in-memory pipe in tests).
    connect: Connect
    keepalive: float = 15.0
    keepalive_count: int = 3
    _open: dict[str, PeerConnection] = field(factory=dict)
    _waiting: dict[str, list[defer.Deferred[PeerConnection]]] = field(factory=dict)

    def current(self, hub: str) -> PeerConnection | None:
        return self._open.get(hub)

    def connection(self, hub: str) -> defer.Deferred[PeerConnection]:
        """The open connection to `hub`, or one opened now; fails with PeerUnreachable."""
        conn = self._open.get(hub)
        if conn is not None:
            return defer.succeed(conn)
        waiter: defer.Deferred[PeerConnection] = defer.Deferred()
        if hub in self._waiting:
            self._waiting[hub].append(waiter)
            return waiter
        self._waiting[hub] = [waiter]

        def unreachable(f: Failure) -> None:
            self._settle(hub, f)

        self.calls.call(Registry.hubs).addCallback(self._dial, hub).addErrback(unreachable)
        return waiter

    def _dial(self, hubs: list[HubRow], hub: str) -> None:
        row = next((h for h in hubs if h.id == hub), None)
        if row is None or not is_live(row.heartbeat, self.clock.seconds()):
            raise PeerUnreachable(f"hub {hub} is not alive")
        published = key_blob(row.peer_key)
        if published is None:
            raise PeerUnreachable(f"hub {hub} publishes no usable peer key")
        try:
            host, port = split_address(row.peer_address)
        except ValueError as e:
            raise PeerUnreachable(f"hub {hub} peer address: {e}") from None
        ready: defer.Deferred[DeviceConnection] = defer.Deferred()
        factory = protocol.ClientFactory()
        factory.protocol = lambda: PeerClientTransport(  # type: ignore[assignment]
            self.hub_id, self.key, hub, published, ready, self.clock, self.keepalive,
            self.keepalive_count)
        log.info("connecting to peer hub {hub} at {address}", hub=hub, address=row.peer_address)

        def failed(f: Failure) -> None:
            if not ready.called:
                ready.errback(PeerUnreachable(
                    f"hub {hub} at {row.peer_address}: {f.getErrorMessage()}"))

        self.connect(host, port, factory).addErrback(failed)
        ready.addTimeout(CONNECT_TIMEOUT, self.clock)
        ready.addBoth(lambda result: self._settle(hub, result))

    def _settle(self, hub: str, result: Any) -> None:
        waiters = self._waiting.pop(hub, [])
        if isinstance(result, Failure):
            why = result.value if isinstance(result.value, PeerUnreachable) else PeerUnreachable(
                f"hub {hub}: {result.getErrorMessage()}")
            log.warn("peer hub {hub} unreachable: {why}", hub=hub, why=str(why))
            for waiter in waiters:
                waiter.errback(why)
            return
        conn: PeerConnection = result
        self._open[hub] = conn

        def lost() -> None:
            if self._open.get(hub) is conn:
                del self._open[hub]
                log.info("connection to peer hub {hub} lost", hub=hub)

        conn.on_lost = lost
        log.info("connected to peer hub {hub}", hub=hub)
        for waiter in waiters:
            waiter.callback(conn)

    def close_all(self) -> None:
        for conn in list(self._open.values()):
            conn.close()
