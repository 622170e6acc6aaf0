"""Channels a logged-in peer may hold on one connection ([limits] max_sessions,
max_channels): 4,000 `register` channels on one login once held 62 MB."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from fuzz_peers import LoggedInPeer, new_hub, uint32, watching
from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS, getNS

from hub.app.config import build_config
from hub.errors import ConfigError


def open_session(peer: LoggedInPeer, sender: int) -> tuple[int, bytes]:
    """Open a session; the hub's answer: (message number, payload)."""
    before = len(peer.replies)
    peer.send(connection.MSG_CHANNEL_OPEN,
              NS(b"session") + struct.pack(">3L", sender, 65536, 32768))
    answers = [r for r in peer.replies[before:]
               if r[0] in (connection.MSG_CHANNEL_OPEN_CONFIRMATION,
                           connection.MSG_CHANNEL_OPEN_FAILURE)]
    assert len(answers) == 1, answers
    return answers[0]


def refusal(payload: bytes) -> tuple[int, bytes]:
    _sender, reason = struct.unpack(">2L", payload[:8])
    return reason, getNS(payload[8:])[0]


def test_session_channels_are_capped_at_ten(tmp_path: Path) -> None:
    _hub, clock, factory, key = new_hub(tmp_path)
    peer = LoggedInPeer(factory, clock, key)
    with watching() as watch:
        answers = [open_session(peer, n) for n in range(12)]
    assert [a[0] for a in answers[:10]] == [connection.MSG_CHANNEL_OPEN_CONFIRMATION] * 10
    for number, payload in answers[10:]:
        assert number == connection.MSG_CHANNEL_OPEN_FAILURE
        assert refusal(payload) == (connection.OPEN_RESOURCE_SHORTAGE,
                                    b"too many sessions on this connection (at most 10)")
    assert watch.tracebacks() == [] and not peer.dropped
    assert any("too many sessions" in str(e.get("text")) for e in watch.events)
    # Closing one makes room for one more.
    local = struct.unpack(">2L", answers[0][1][:8])[1]
    peer.send(connection.MSG_CHANNEL_CLOSE, uint32(local))
    assert open_session(peer, 20)[0] == connection.MSG_CHANNEL_OPEN_CONFIRMATION
    assert open_session(peer, 21)[0] == connection.MSG_CHANNEL_OPEN_FAILURE
    assert len(peer.server.service.channels) == 10


def test_a_flood_of_opens_holds_no_more_than_the_cap(tmp_path: Path) -> None:
    _hub, clock, factory, key = new_hub(tmp_path)
    peer = LoggedInPeer(factory, clock, key)
    for n in range(400):
        peer.client.sendPacket(connection.MSG_CHANNEL_OPEN,
                               NS(b"session") + struct.pack(">3L", n, 65536, 32768))
    peer.pump.flush()
    assert len(peer.server.service.channels) == 10
    assert len(peer.server.service._peer_channels) == 10


def test_channels_of_any_kind_are_capped(tmp_path: Path) -> None:
    (tmp_path / "callhomehub.toml").write_text("[limits]\nmax_channels = 3\n")
    _hub, clock, factory, key = new_hub(tmp_path)
    peer = LoggedInPeer(factory, clock, key)
    answers = [open_session(peer, n) for n in range(4)]
    assert [a[0] for a in answers[:3]] == [connection.MSG_CHANNEL_OPEN_CONFIRMATION] * 3
    assert refusal(answers[3][1]) == (connection.OPEN_RESOURCE_SHORTAGE,
                                      b"too many channels on this connection (at most 3)")


def test_refused_opens_do_not_count(tmp_path: Path) -> None:
    _hub, clock, factory, key = new_hub(tmp_path)
    peer = LoggedInPeer(factory, clock, key)
    for n in range(80):
        peer.send(connection.MSG_CHANNEL_OPEN, NS(b"x11") + struct.pack(">3L", n, 65536, 32768))
    assert open_session(peer, 99)[0] == connection.MSG_CHANNEL_OPEN_CONFIRMATION


@pytest.mark.parametrize("key", ["max_sessions", "max_channels"])
def test_channel_limits_must_be_positive(tmp_path: Path, key: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(f"[limits]\n{key} = 0\n")
    with pytest.raises(ConfigError, match=rf"\[limits\] {key} must be >= 1"):
        build_config({"data": str(tmp_path), "config": str(path)})
