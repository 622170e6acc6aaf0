"""
ModernTransportMixin in memory: a Conch server and a Conch client, both
with the mixin, joined by twisted.test.iosim and one MemoryReactorClock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from attrs import define
from twisted.conch.ssh.common import NS, getNS
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.test import iosim

from hub.ssh.ciphers import IMPLICIT_MAC, isAEAD
from hub.ssh.modern import (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    CIPHERS,
    MACS,
    USERAUTH_SIGNATURE_ALGORITHMS,
)
from hub.ssh.packet import EncryptAndMAC
from hub.ssh.testing import (
    ClientPeer,
    CommandSession,
    ModernClientTransport,
    ModernServerTransport,
    makeServerFactory,
    newEd25519Key,
    newRSAKey,
)

Setup = Callable[[Any], None]


@define
class Pair:
    server: ModernServerTransport
    client: ModernClientTransport
    peer: ClientPeer
    pump: iosim.IOPump
    clock: MemoryReactorClock
    sessions: list[CommandSession]

    def run(self) -> None:
        for _ in range(20000):
            if not self.pump.pump():
                return
        raise AssertionError("connection never went quiet")

    def send(self, data: bytes) -> None:
        assert self.peer.channel is not None
        self.peer.channel.write(data)

    @property
    def output(self) -> bytes:
        assert self.peer.channel is not None
        return self.peer.channel.output


def connect(
    server: Setup | None = None,
    client: Setup | None = None,
    user_key: Any = None,
    greet: bool = True,
) -> Pair:
    clock = MemoryReactorClock()
    host_key = newEd25519Key()
    user_key = user_key or newEd25519Key()
    factory = makeServerFactory(host_key, b"alice", user_key, clock)
    factory.startFactory()
    server_proto = factory.buildProtocol(None)
    peer = ClientPeer(b"alice", user_key, host_key, command=b"cat")
    client_proto = peer.buildProtocol(clock)
    if server:
        server(server_proto)
    if client:
        client(client_proto)
    pump = iosim.connect(
        server_proto,
        iosim.makeFakeServer(server_proto),
        client_proto,
        iosim.makeFakeClient(client_proto),
        greet=False,
        clock=clock,
    )
    pair = Pair(server_proto, client_proto, peer, pump, clock, factory.realm.sessions)  # type: ignore[attr-defined, arg-type]
    if greet:
        pair.run()
    return pair


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    observer = seen.append
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def disconnects(events: list[LogEvent]) -> list[bytes]:
    return [e["description"] for e in events if "description" in e and "code" in e]


def rekeys(events: list[LogEvent], transport: object, why: str) -> int:
    return sum(
        1 for e in events if e.get("log_source") is transport and e.get("why") == why
    )


COMBINATIONS = [(c, MACS[0]) for c in CIPHERS if isAEAD(c)] + [
    (c, m) for c in (b"aes128-ctr", b"aes256-ctr") for m in MACS
]


@pytest.mark.parametrize("cipher,mac", COMBINATIONS)
def test_each_cipher_carries_channel_data(cipher: bytes, mac: bytes) -> None:
    def only(t: Any) -> None:
        t.supportedCiphers = [cipher]
        t.supportedMACs = [mac]

    pair = connect(client=only)
    data = bytes(range(256)) * 300
    pair.send(data)
    pair.run()
    assert pair.output == data
    expected_mac = IMPLICIT_MAC if isAEAD(cipher) else mac
    for ciphers in (pair.server.currentEncryptions, pair.client.currentEncryptions):
        assert (ciphers.outCipType, ciphers.inCipType) == (cipher, cipher)
        assert (ciphers.outMACType, ciphers.inMACType) == (expected_mac, expected_mac)
    assert pair.server._strict and pair.client._strict


def test_defaults_prefer_chacha20_and_drop_weak_algorithms() -> None:
    pair = connect()
    assert pair.server.currentEncryptions.outCipType == CHACHA20_POLY1305
    for transport in (pair.server, pair.client):
        offered = b",".join(getNS(transport.ourKexInitPayload[17:], 10)[:10])
        for weak in (b"cbc", b"3des", b"md5", b"hmac-sha1", b"group1-", b"group14-sha1",
                     b"group-exchange-sha1", b"ssh-rsa,", b"ssh-dss", b"zlib"):
            assert weak not in offered + b",", weak


def test_aead_needs_no_common_mac() -> None:
    pair = connect(
        server=lambda t: setattr(t, "supportedMACs", [b"hmac-sha2-512"]),
        client=lambda t: (
            setattr(t, "supportedMACs", [b"hmac-sha2-256-etm@openssh.com"]),
            setattr(t, "supportedCiphers", [AES256_GCM]),
        ),
    )
    pair.send(b"gcm without a common MAC")
    pair.run()
    assert pair.output == b"gcm without a common MAC"


def test_non_aead_still_needs_a_common_mac(events: list[LogEvent]) -> None:
    pair = connect(
        server=lambda t: setattr(t, "supportedMACs", [b"hmac-sha2-512"]),
        client=lambda t: (
            setattr(t, "supportedMACs", [b"hmac-sha2-256"]),
            setattr(t, "supportedCiphers", [b"aes128-ctr"]),
        ),
    )
    assert pair.peer.channel is None
    assert b"couldn't match all kex parts" in disconnects(events)


def test_markers_only_in_first_kexinit() -> None:
    pair = connect(server=lambda t: setattr(t, "rekeyDataLimit", 20000))
    first = {t: getNS(t.ourKexInitPayload[17:])[0].split(b",") for t in (pair.server, pair.client)}
    assert {b"ext-info-s", b"kex-strict-s-v00@openssh.com"} <= set(first[pair.server])
    assert {b"ext-info-c", b"kex-strict-c-v00@openssh.com"} <= set(first[pair.client])
    pair.send(b"x" * 50000)
    pair.run()
    for t in (pair.server, pair.client):
        again = getNS(t.ourKexInitPayload[17:])[0].split(b",")
        assert not any(b"ext-info" in n or b"kex-strict" in n for n in again)


def test_server_sig_algs_and_ext_info() -> None:
    pair = connect()
    advertised = pair.client.peerExtensions[b"server-sig-algs"].split(b",")
    assert advertised == list(USERAUTH_SIGNATURE_ALGORITHMS)


@pytest.mark.parametrize(
    "sigAlgs,expected",
    [
        (USERAUTH_SIGNATURE_ALGORITHMS, b"rsa-sha2-512"),
        ((b"ssh-ed25519", b"rsa-sha2-256"), b"rsa-sha2-256"),
        ((b"ssh-ed25519", b"ssh-rsa"), None),
    ],
)
def test_rsa_user_key_signs_with_sha2(
    events: list[LogEvent], sigAlgs: tuple[bytes, ...], expected: bytes | None
) -> None:
    pair = connect(
        server=lambda t: setattr(t, "serverSigAlgs", sigAlgs), user_key=newRSAKey()
    )
    used = [e["algorithm"] for e in events if "algorithm" in e]
    if expected is None:
        assert used == [] and pair.peer.channel is None
    else:
        assert used == [expected] and pair.peer.channel is not None
        pair.send(b"rsa")
        pair.run()
        assert pair.output == b"rsa"


def test_keepalive_global_request_still_works() -> None:
    pair = connect()
    results: list[object] = []
    d = pair.server.service.sendGlobalRequest(  # type: ignore[union-attr]
        b"keepalive@openssh.com", b"", wantReply=True
    )
    d.addBoth(results.append)
    pair.run()
    assert len(results) == 1  # answered (Conch's client says "failure")


@pytest.mark.parametrize("side", ["server", "client"])
def test_rekey_after_data_limit(events: list[LogEvent], side: str) -> None:
    limit = 32 * 1024
    pair = connect(**{side: lambda t: setattr(t, "rekeyDataLimit", limit)})
    initiator = getattr(pair, side)
    session_id = pair.server.sessionID
    sent = b""
    for i in range(40):
        chunk = bytes([i]) * 7000
        pair.send(chunk)
        sent += chunk
        pair.pump.pump()
    pair.run()
    assert pair.output == sent
    assert rekeys(events, initiator, "data limit") >= 5
    assert pair.server.sessionID == pair.client.sessionID == session_id
    assert pair.server._meter.bytesOut < limit + 40000


def test_rekey_after_time_limit_without_stalling(events: list[LogEvent]) -> None:
    pair = connect(client=lambda t: setattr(t, "rekeyTimeLimit", None))
    pair.send(b"before ")
    pair.run()
    keys = pair.server.currentEncryptions
    pair.clock.advance(3599)
    assert rekeys(events, pair.server, "time limit") == 0
    pair.clock.advance(1)
    assert rekeys(events, pair.server, "time limit") == 1
    assert pair.server._keyExchangeState == pair.server._KEY_EXCHANGE_REQUESTED
    # Data both ways while the exchange runs: queued, then delivered.
    pair.send(b"during ")
    pair.sessions[0].write(b"[server] ")
    pair.run()
    pair.send(b"after")
    pair.run()
    assert pair.output == b"before [server] during after"
    assert pair.server.currentEncryptions is not keys
    assert pair.server._keyExchangeState == pair.server._KEY_EXCHANGE_NONE
    pair.clock.advance(3600)
    pair.run()
    assert rekeys(events, pair.server, "time limit") == 2


def test_simultaneous_rekey(events: list[LogEvent]) -> None:
    pair = connect()
    pair.clock.advance(3600)  # both sides' timers fire
    assert rekeys(events, pair.server, "time limit") == 1
    assert rekeys(events, pair.client, "time limit") == 1
    pair.send(b"still fine")
    pair.run()
    assert pair.output == b"still fine"


def test_strict_kex_resets_sequence_numbers() -> None:
    strict = connect()
    loose = connect(server=lambda t: setattr(t, "strictKex", False))
    assert not loose.client._strict and strict.client._strict
    # KEXINIT, the key exchange message and NEWKEYS were forgotten.
    assert loose.server.incomingPacketSequence - strict.server.incomingPacketSequence == 3
    assert loose.client.incomingPacketSequence - strict.client.incomingPacketSequence == 3


def _ignorePacket() -> bytes:
    return EncryptAndMAC.fromCipher(b"none", None, None).seal(0, b"\x02" + NS(b"x"))


def _terrapin(pair: Pair) -> None:
    """
    A man in the middle adds an IGNORE before the server's NEWKEYS and
    deletes the server's first encrypted packet (EXT_INFO), the Terrapin
    prefix truncation.
    """
    server_io, client_io = pair.pump.serverIO, pair.pump.clientIO
    # Versions and KEXINITs, then the client's key exchange message.
    for _ in range(2):
        pair.pump.pump()
    # The server's reply and NEWKEYS, with the attacker's IGNORE first.
    client_io.bufferReceived(_ignorePacket() + server_io.getOutBuffer())
    # The client's NEWKEYS and service request reach the server ...
    server_io.bufferReceived(client_io.getOutBuffer())
    # ... whose first packet under the new keys, EXT_INFO, is dropped (a
    # strict client has already disconnected, so there is none).
    server_io.stream = server_io.stream[1:]
    pair.run()


def test_terrapin_injection_drops_strict_connection(events: list[LogEvent]) -> None:
    pair = connect(greet=False)
    _terrapin(pair)
    assert pair.peer.channel is None
    assert any(d.startswith(b"strict KEX violation: unexpected packet type 2")
               for d in disconnects(events))


def test_without_strict_kex_the_injection_is_tolerated(events: list[LogEvent]) -> None:
    # The server did not offer strict kex: the IGNORE is accepted and the
    # truncation goes unnoticed (the Terrapin attack succeeds).
    pair = connect(server=lambda t: setattr(t, "strictKex", False), greet=False)
    _terrapin(pair)
    assert not disconnects(events)
    assert pair.peer.channel is not None and pair.peer.channel.opened
    assert pair.client.peerExtensions == {}


def test_kexinit_must_be_first_packet(events: list[LogEvent]) -> None:
    pair = connect(greet=False)
    client_io = pair.pump.clientIO
    data = client_io.getOutBuffer()
    version, _, kexinit = data.partition(b"\r\n")
    client_io.stream = [version + b"\r\n" + _ignorePacket() + kexinit]
    pair.run()
    assert b"strict KEX violation: KEXINIT was not the first packet" in disconnects(events)
    assert pair.peer.channel is None


def test_a_disconnect_the_hub_sends_is_one_line_in_words(events: list[LogEvent]) -> None:
    pair = connect()
    pair.server.sendDisconnect(11, b"hub stopping")
    pair.run()
    lines = [formatEvent(e) for e in events if e.get("log_source") is pair.server
             and "code" in e]
    (line,) = lines
    assert line.endswith(": disconnecting: hub stopping (by application)"), line
    assert "\n" not in line
    assert not [e for e in events if "Disconnecting with error" in (formatEvent(e) or "")]


def test_ignore_before_kexinit_tolerated_without_strict_kex(events: list[LogEvent]) -> None:
    # AES-GCM does not use sequence numbers, so the shift goes unnoticed.
    pair = connect(
        client=lambda t: (
            setattr(t, "strictKex", False),
            setattr(t, "supportedCiphers", [AES128_GCM]),
        ),
        greet=False,
    )
    client_io = pair.pump.clientIO
    version, _, kexinit = client_io.getOutBuffer().partition(b"\r\n")
    client_io.stream = [version + b"\r\n" + _ignorePacket() + kexinit]
    pair.run()
    assert not disconnects(events)
    assert pair.peer.channel is not None and pair.peer.channel.opened


def test_no_ignore_sent_during_strict_initial_kex() -> None:
    pair = connect(greet=False)
    pair.pump.pump()  # KEXINITs exchanged: strict kex agreed, kex running
    assert pair.server._strict and pair.server._initialKex
    before = len(pair.pump.serverIO.stream)
    pair.server.sendIgnore(b"padding")
    assert len(pair.pump.serverIO.stream) == before
    assert (2, NS(b"padding")) in pair.server._blockedByKeyExchange
    pair.run()
    assert pair.peer.channel is not None
