"""An in-memory hub and Conch client joined by iosim, on a MemoryReactorClock."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import connection, keys, transport, userauth
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect

from hub.access.auth import hash_password
from hub.access.recordings import open_recordings
from hub.access.server import HubSSHFactory
from hub.app.config import build_config
from hub.app.context import Hub
from hub.app.service import build_ssh_factory
from hub.ssh.keys import load_hub_keys
from hub.ssh.modern import ModernTransportMixin
from hub.store.offthread import RegistryCalls, RegistryThread
from hub.store.registry import Registry
from hub.tunnel.expiry import PendingLeaseExpiry
from hub.tunnel.sessions import LiveSessions

T = TypeVar("T")


def make_hub(tmp_path: Path, clock: MemoryReactorClock, **options: Any) -> Hub:
    config = build_config({"data": str(tmp_path), **options})
    registry = Registry(config.db_path, now=clock.seconds)
    registry.set_setting("callhome_password", hash_password(b"secret", rounds=4), "test")
    sessions = LiveSessions(registry, clock, clock, config.port_low, config.port_high,
                            config.public_interface, caps=config.limits.forward_caps())
    hub = Hub(config, registry, load_hub_keys(config.keys_dir), clock,
              lambda f, *a: defer.maybeDeferred(f, *a), sessions, clock)
    hub.lease_expiry = PendingLeaseExpiry(registry, clock, config.limits.pending_lease_expiry)
    hub.recordings = open_recordings(registry, config.recordings_dir, clock, hub.run_in_thread,
                                     config.recordings)
    return hub


def registry_thread(data: Path, clock: MemoryReactorClock) -> RegistryThread:
    """A registry thread on `data`'s registry file (its own connection), whose
    results wait for `settle` (a MemoryReactorClock takes no calls from threads)."""
    return RegistryThread(lambda: Registry(str(data / "hub.sqlite3"), now=clock.seconds), None,
                          clock)


def settle(calls: Hub | RegistryCalls) -> None:
    """The one wait for tests: let the registry calls finish and their Deferreds
    fire (calls run in a RegistryThread; inline calls have finished already)."""
    drain = getattr(calls.calls if isinstance(calls, Hub) else calls, "drain", None)
    if drain is not None:
        drain()


def outcome(calls: Hub | RegistryCalls, d: defer.Deferred[T]) -> T:
    """The result of `d`, once the registry calls have settled."""
    settle(calls)
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "the Deferred has not fired"
    if isinstance(got[0], Failure):
        got[0].raiseException()
    return got[0]  # type: ignore[no-any-return]


class LaterCalls:
    """Registry calls answered on the next turn of the clock, as a registry
    thread answers them: what arrives meanwhile finds them pending."""

    def __init__(self, inner: Any, clock: Any) -> None:
        self.inner, self.clock = inner, clock

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        later: defer.Deferred[Any] = defer.Deferred()
        result = self.inner.call(fn, *args, **kwargs)
        self.clock.callLater(0, lambda: result.chainDeferred(later))
        return later

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def new_key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


class ClientConnection(connection.SSHConnection):
    def serviceStarted(self) -> None:
        connection.SSHConnection.serviceStarted(self)
        self.transport.factory_state["connected"] = True


class ClientAuth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, key: keys.Key | None, password: bytes | None) -> None:
        userauth.SSHUserAuthClient.__init__(self, user, ClientConnection())
        self.key = key
        self.password = password

    def getPublicKey(self) -> Any:
        key, self.key = self.key, None  # offer it once
        return None if key is None else key.public()

    def getPrivateKey(self) -> Any:
        return defer.succeed(self._private)

    def getPassword(self, prompt: Any = None) -> Any:
        password, self.password = self.password, None
        return None if password is None else defer.succeed(password)


class ClientTransport(ModernTransportMixin, transport.SSHClientTransport):
    """A client as OpenSSH's today: the hub offers no encrypt-and-MAC, NIST-curve kex or
    ECDSA host key by default, and Conch's own client has nothing else."""

    rekeyTimeLimit = None  # no timer on the global reactor

    def __init__(self, user: bytes | None, key: keys.Key | None, password: bytes | None) -> None:
        self.user, self.key, self.password = user, key, password
        self.factory_state: dict[str, Any] = {}

    def verifyHostKey(self, pubKey: bytes, fingerprint: bytes) -> Any:
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        if self.user is None:
            return  # connect, then never authenticate
        auth = ClientAuth(self.user, self.key, self.password)
        auth._private = self.key
        self.requestService(auth)


def connect_client(factory: HubSSHFactory, clock: MemoryReactorClock, user: bytes | None,
                   key: keys.Key | None = None, password: bytes | None = None,
                   peer: str = "192.0.2.10") -> tuple[Any, ClientTransport, IOPump]:
    server = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    client = ClientTransport(user, key, password)
    pump = connect(server, FakeTransport(server, isServer=True,
                                         peerAddress=IPv4Address("TCP", peer, 40000)),
                   client, FakeTransport(client, isServer=False), greet=False)
    for _ in range(20):
        pump.pump()
    return server, client, pump


def start_factory(hub: Hub) -> HubSSHFactory:
    factory = build_ssh_factory(hub)
    factory.startFactory()
    return factory
