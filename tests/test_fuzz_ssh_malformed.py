"""Malformed or out-of-order packets a peer sent that once gave tracebacks.

Each must end that connection with DISCONNECT (protocol error) and one log
line, never a traceback; well-formed traffic keeps Conch's behaviour.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz_peers import (
    HostileServer,
    LoggedInPeer,
    LogWatch,
    RawPeer,
    new_hub,
    uint32,
    watching,
)
from twisted.conch.ssh import connection, transport
from twisted.conch.ssh.common import NS

MSG_KEX_ECDH_INIT = 30


@pytest.fixture
def hub_parts(tmp_path: Path) -> Any:
    return new_hub(tmp_path)


@pytest.fixture
def watch() -> Iterator[LogWatch]:
    with watching() as w:
        yield w


def kexinit(kex: bytes = b"curve25519-sha256,kex-strict-c-v00@openssh.com") -> bytes:
    lists = [kex, b"ssh-ed25519,rsa-sha2-256", b"chacha20-poly1305@openssh.com",
             b"chacha20-poly1305@openssh.com", b"hmac-sha2-256", b"hmac-sha2-256",
             b"none", b"none", b"", b""]
    return (bytes((transport.MSG_KEXINIT,)) + os.urandom(16)
            + b"".join(NS(x) for x in lists) + b"\x00" + uint32(0))


def assert_dropped_cleanly(watch: LogWatch, server: Any, dropped: bool) -> None:
    assert watch.tracebacks() == []
    assert dropped
    assert len(watch.protocol_errors(server)) == 1, watch.disconnects(server)
    assert len(watch.disconnects(server)) == 1


@pytest.mark.parametrize("payloads", [
    pytest.param([bytes((transport.MSG_NEWKEYS,))], id="newkeys-first"),
    pytest.param([kexinit(), bytes((MSG_KEX_ECDH_INIT,)) + NS(b"short")],
                 id="curve25519-key-not-32-bytes"),
    pytest.param([bytes((transport.MSG_UNIMPLEMENTED,)) + b"\x00\x01"],
                 id="truncated-unimplemented"),
    pytest.param([bytes((MSG_KEX_ECDH_INIT,)) + NS(b"k" * 32)], id="kex-before-kexinit"),
])
def test_before_key_exchange(hub_parts: Any, watch: LogWatch, payloads: list[bytes]) -> None:
    _hub, _clock, factory, _key = hub_parts
    peer = RawPeer(factory)
    peer.send(*payloads)
    assert_dropped_cleanly(watch, peer.server, peer.dropped)


def test_well_formed_kexinit_is_answered(hub_parts: Any, watch: LogWatch) -> None:
    _hub, _clock, factory, _key = hub_parts
    peer = RawPeer(factory)
    peer.send(kexinit())
    assert not peer.dropped and watch.disconnects(peer.server) == []


@pytest.mark.parametrize("number", [
    connection.MSG_CHANNEL_DATA, connection.MSG_CHANNEL_EXTENDED_DATA,
    connection.MSG_CHANNEL_WINDOW_ADJUST, connection.MSG_CHANNEL_EOF,
    connection.MSG_CHANNEL_CLOSE, connection.MSG_CHANNEL_REQUEST,
    connection.MSG_CHANNEL_SUCCESS, connection.MSG_CHANNEL_FAILURE,
    connection.MSG_CHANNEL_OPEN_CONFIRMATION, connection.MSG_CHANNEL_OPEN_FAILURE,
])
def test_unknown_channel_number(hub_parts: Any, watch: LogWatch, number: int) -> None:
    _hub, clock, factory, key = hub_parts
    peer = LoggedInPeer(factory, clock, key)
    peer.send(number, uint32(7) + NS(b"exit-status") + b"\x00" + uint32(0) * 4)
    assert_dropped_cleanly(watch, peer.server, peer.dropped)


def test_truncated_channel_open(hub_parts: Any, watch: LogWatch) -> None:
    _hub, clock, factory, key = hub_parts
    peer = LoggedInPeer(factory, clock, key)
    peer.send(connection.MSG_CHANNEL_OPEN, NS(b"direct-tcpip") + b"\x00\x00")
    assert_dropped_cleanly(watch, peer.server, peer.dropped)


def test_short_direct_tcpip_data_is_refused_not_dropped(hub_parts: Any,
                                                        watch: LogWatch) -> None:
    _hub, clock, factory, key = hub_parts
    peer = LoggedInPeer(factory, clock, key)
    peer.send(connection.MSG_CHANNEL_OPEN,
              NS(b"direct-tcpip") + uint32(0) + uint32(65536) + uint32(32768) + b"\x00\x00")
    assert watch.tracebacks() == []
    assert not peer.dropped
    assert any("malformed direct-tcpip" in str(e.get("text")) for e in watch.events)


@pytest.mark.parametrize("payload", [
    pytest.param(b"", id="empty"),
    pytest.param(NS(b"tcpip-forward"), id="no-want-reply"),
])
def test_truncated_global_request(hub_parts: Any, watch: LogWatch, payload: bytes) -> None:
    _hub, clock, factory, key = hub_parts
    peer = LoggedInPeer(factory, clock, key)
    peer.send(connection.MSG_GLOBAL_REQUEST, payload)
    assert_dropped_cleanly(watch, peer.server, peer.dropped)


@pytest.mark.parametrize("want_reply", [b"\x00", b"\x01"])
def test_unparsable_channel_request_is_refused(hub_parts: Any, watch: LogWatch,
                                              want_reply: bytes) -> None:
    # Found by fuzzing: a short `exec` that asked for no reply left an
    # unhandled failure in a Deferred, logged as a traceback when collected.
    _hub, clock, factory, key = hub_parts
    peer = LoggedInPeer(factory, clock, key)
    peer.send(connection.MSG_CHANNEL_OPEN, NS(b"session") + uint32(0) + uint32(65536)
              + uint32(32768))
    peer.send(connection.MSG_CHANNEL_REQUEST, uint32(0) + NS(b"exec") + want_reply + b"\x00")
    gc.collect()
    assert watch.tracebacks() == []
    assert not peer.dropped
    assert any(e.get("req") == "exec" and "refused" in e.get("log_format", "")
               for e in watch.events)
    failures = [r for r in peer.replies if r[0] == connection.MSG_CHANNEL_FAILURE]
    assert len(failures) == (1 if want_reply == b"\x01" else 0)


@pytest.mark.parametrize("channel_type", [b"session", b"x11", b"auth-agent@openssh.com"])
def test_hub_client_refuses_channels_a_device_opens(watch: LogWatch,
                                                    channel_type: bytes) -> None:
    # Found by fuzzing: Conch's client refused them with a traceback.
    device = HostileServer()
    device.send(connection.MSG_CHANNEL_OPEN, NS(channel_type) + uint32(0) + uint32(65536)
                + uint32(32768))
    assert watch.tracebacks() == []
    assert not device.dropped
    assert any("refused channel" in e.get("log_format", "") for e in watch.events)


def test_hub_client_drops_a_device_naming_unknown_channels(watch: LogWatch) -> None:
    device = HostileServer()
    device.send(connection.MSG_CHANNEL_REQUEST, uint32(5) + NS(b"exit-status") + b"\x00"
                + uint32(0))
    assert watch.tracebacks() == []
    assert device.dropped
    assert len(watch.protocol_errors(device.client)) == 1


@pytest.mark.parametrize("number", [connection.MSG_CHANNEL_OPEN_CONFIRMATION,
                                    connection.MSG_CHANNEL_OPEN_FAILURE])
def test_open_reply_for_a_channel_already_open(hub_parts: Any, watch: LogWatch,
                                               number: int) -> None:
    # Found by fuzzing: OPEN_FAILURE for the session the peer itself had
    # opened made Conch forget the channel halfway, and the connection's end
    # raised KeyError.  Open replies are only for opens the hub is waiting on.
    _hub, clock, factory, key = hub_parts
    peer = LoggedInPeer(factory, clock, key)
    peer.send(connection.MSG_CHANNEL_OPEN, NS(b"session") + uint32(0) + uint32(65536)
              + uint32(32768))
    peer.send(number, uint32(0) * 4)
    peer.close()
    gc.collect()
    assert_dropped_cleanly(watch, peer.server, peer.dropped)
