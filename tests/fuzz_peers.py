"""Hostile SSH peers for the malformed-input tests and fuzz targets.

`RawPeer` speaks to the hub's real server transport before key exchange,
packet by packet in the clear; `LoggedInPeer` logs in to an in-memory hub
with a Conch client and then sends whatever payloads it is given, sealed
under the negotiated keys; `HostileServer` does the same to the hub's own
SSH client once it has logged in. Both watch the log: `LogWatch.tracebacks` must stay
empty, whatever the peer sends.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memory_hub import connect_client, make_hub, new_key, start_factory
from twisted.conch.ssh import keys
from twisted.conch.ssh.transport import DISCONNECT_PROTOCOL_ERROR
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.test import iosim

from hub.access.device_client import DeviceClientTransport
from hub.access.server import HubSSHFactory
from hub.app.context import Hub
from hub.ssh.packet import EncryptAndMAC
from hub.ssh.testing import makeServerFactory, newEd25519Key

VERSION = b"SSH-2.0-OpenSSH_9.6\r\n"
_CLEAR = EncryptAndMAC.fromCipher(b"none", None, None)


class LogWatch:
    """The log events emitted while it watches."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def tracebacks(self) -> list[LogEvent]:
        return [e for e in self.events if "log_failure" in e]

    def disconnects(self, source: object) -> list[tuple[int, bytes]]:
        """(code, description) of each disconnect `source` (a transport) sent."""
        return [(e["code"], e["description"]) for e in self.events
                if e.get("log_source") is source and "code" in e and "description" in e]

    def protocol_errors(self, source: object) -> list[bytes]:
        return [d for c, d in self.disconnects(source) if c == DISCONNECT_PROTOCOL_ERROR]

    def lines(self, source: object) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_source") is source]


@contextmanager
def watching() -> Iterator[LogWatch]:
    watch = LogWatch()
    globalLogPublisher.addObserver(watch.events.append)
    try:
        yield watch
    finally:
        globalLogPublisher.removeObserver(watch.events.append)


def clear_packet(seqnr: int, payload: bytes) -> bytes:
    """A packet as sent before the first NEWKEYS (no cipher, no MAC)."""
    return _CLEAR.seal(seqnr, payload)


def new_hub(data: Path) -> tuple[Hub, MemoryReactorClock, HubSSHFactory, keys.Key]:
    """An in-memory hub with node `site-a` registered; its key is returned."""
    clock = MemoryReactorClock()
    hub = make_hub(data, clock)
    key = new_key()
    hub.registry.register("site-a", key.public().blob(), "fp", "test")
    return hub, clock, start_factory(hub), key


_ADDRESSES = (f"198.18.{n // 256 % 256}.{n % 256}" for n in itertools.count())


def next_address() -> str:
    """A peer address of its own for each case: thousands of cases from one address
    would meet the per-source caps and penalties (tested on their own elsewhere)."""
    return next(_ADDRESSES)


class RawPeer:
    """A connection to the hub's server transport that writes raw bytes."""

    def __init__(self, factory: HubSSHFactory, peer: str | None = None) -> None:
        address = IPv4Address("TCP", peer or next_address(), 40000)
        self.server: Any = factory.buildProtocol(address)
        self.wire = StringTransport(peerAddress=address)
        self.server.makeConnection(self.wire)
        self.seqnr = 0

    def send(self, *payloads: bytes, version: bytes = VERSION) -> None:
        """The version line (if any), then each payload as one clear packet."""
        data = version
        for payload in payloads:
            data += clear_packet(self.seqnr, payload)
            self.seqnr += 1
        self.server.dataReceived(data)

    def write(self, data: bytes) -> None:
        self.server.dataReceived(data)

    @property
    def dropped(self) -> bool:
        return bool(self.wire.disconnecting)

    def close(self) -> None:
        self.server.connectionLost(None)


class LoggedInPeer:
    """The hub's registrar user, logged in with node `site-a`'s key; `send`
    seals any payload under the session keys, as a buggy client would."""

    def __init__(self, factory: HubSSHFactory, clock: MemoryReactorClock, key: keys.Key,
                 user: bytes = b"cms", peer: str = "192.0.2.67") -> None:
        self.server, self.client, self.pump = connect_client(factory, clock, user, key=key,
                                                             peer=peer)
        assert self.client.factory_state.get("connected"), "login failed"
        # The client opened nothing: it records what the hub answers (its
        # Conch connection would choke on replies to channels it never had).
        self.replies: list[tuple[int, bytes]] = []
        self.client.service.packetReceived = lambda n, p: self.replies.append((n, p))

    def send(self, number: int, payload: bytes) -> None:
        self.client.sendPacket(number, payload)
        for _ in range(20):
            if not self.pump.pump():
                break

    @property
    def dropped(self) -> bool:
        return bool(self.server.transport.disconnecting)

    def close(self) -> None:
        if not self.server.transport.disconnected:
            self.server.transport.loseConnection()
            self.pump.flush()


class HostileServer:
    """The hub's SSH client (to a device, or NETCONF call home) logged in to
    a Conch server that then sends whatever payloads it is given."""

    def __init__(self, clock: MemoryReactorClock | None = None) -> None:
        self.clock = clock or MemoryReactorClock()
        user_key = _cached_key("user")
        factory = makeServerFactory(_cached_key("host"), b"root", user_key, self.clock)
        factory.startFactory()
        self.server: Any = factory.buildProtocol(None)
        self.client = DeviceClientTransport(b"root", user_key, None, None, defer.Deferred(),
                                            self.clock)
        self.client.ready.addErrback(lambda _: None)
        self.pump = iosim.connect(self.server, iosim.makeFakeServer(self.server), self.client,
                                  iosim.makeFakeClient(self.client), greet=False,
                                  clock=self.clock)
        self.pump.flush()
        assert self.client.ready.called and self.client.service is not None, "login failed"
        # What the client answers is recorded, not parsed: the server asked nothing.
        self.server.service.packetReceived = lambda n, p: None

    def send(self, number: int, payload: bytes) -> None:
        self.server.sendPacket(number, payload)
        self.pump.flush()

    @property
    def dropped(self) -> bool:
        return bool(self.client.transport.disconnecting)

    def close(self) -> None:
        self.client.transport.loseConnection()
        self.pump.flush()


_KEYS: dict[str, keys.Key] = {}


def _cached_key(name: str) -> keys.Key:
    if name not in _KEYS:
        _KEYS[name] = newEd25519Key()
    return _KEYS[name]


def uint32(n: int) -> bytes:
    return struct.pack(">L", n)
