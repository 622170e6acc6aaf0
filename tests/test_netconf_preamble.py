"""The Junos outbound-ssh preamble parser (sans-IO) and the call-home protocol's first bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
from memory_hub import make_hub, new_key
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from hub.access.device_client import LOGIN_TIMEOUT
from hub.netconf.callhome import CallHomeFactory
from hub.netconf.devices import Decision, NetconfSessions, default_name
from hub.netconf.devices import identify as identify_with
from hub.netconf.preamble import (
    MAX_PREAMBLE,
    Preamble,
    PreambleError,
    PreambleParser,
    authenticate,
    host_key_blob,
)
from hub.store.registry import Registry

SSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
HOST_KEY = new_key().public().toString("openssh").decode()
SECRET = "s3cret"


def preamble(device: str = "router1", *, host_key: str | None = None,
             mac: str | None = None) -> bytes:
    lines = ["MSG-ID: DEVICE-CONN-INFO", "MSG-VER: V1", f"DEVICE-ID: {device}"]
    if host_key is not None:
        lines.append(f"HOST-KEY: {host_key}")
    if mac is not None:
        lines.append(f"HMAC: {mac}")
    return "".join(line + "\r\n" for line in lines).encode()


def sha1_hmac(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha1).hexdigest()


def parse(data: bytes, chunk: int = 0) -> tuple[Preamble | None, bytes]:
    parser = PreambleParser(Clock())
    pieces = [data] if not chunk else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for i, piece in enumerate(pieces):
        result = parser.feed(piece)
        if result is not None:  # what follows goes to the SSH client
            return result.preamble, result.rest + b"".join(pieces[i + 1:])
    raise AssertionError("no result")


def test_no_preamble_hands_everything_to_ssh() -> None:
    assert parse(SSH + b"\x00\x00kexinit") == (None, SSH + b"\x00\x00kexinit")
    # Byte by byte: "S", "SS", "SSH" are waited on, not misread.
    assert parse(SSH, chunk=1) == (None, SSH)


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_preamble_without_secret(chunk: int) -> None:
    found, rest = parse(preamble() + SSH + b"binary", chunk)
    assert found == Preamble("router1") and rest == SSH + b"binary"


def test_preamble_with_host_key_hmac_nul_padding_and_blank_lines() -> None:
    mac = sha1_hmac(SECRET, HOST_KEY)
    data = preamble(host_key=HOST_KEY + "\x00\x00", mac=mac.upper()) + b"\r\n\r\n" + SSH
    found, rest = parse(data)
    assert found == Preamble("router1", HOST_KEY, mac.upper()) and rest == SSH
    assert found is not None
    vouched = authenticate(found, {"router1": SECRET})
    assert vouched == base64.b64decode(HOST_KEY.split()[1])


def test_wrong_or_missing_hmac_is_refused() -> None:
    wrong = Preamble("router1", HOST_KEY, sha1_hmac("guess", HOST_KEY))
    with pytest.raises(PreambleError, match="wrong HMAC"):
        authenticate(wrong, {"router1": SECRET})
    with pytest.raises(PreambleError, match="secret is configured"):
        authenticate(Preamble("router1"), {"router1": SECRET})
    with pytest.raises(PreambleError, match="no secret is configured"):
        authenticate(Preamble("router1", HOST_KEY, sha1_hmac(SECRET, HOST_KEY)), {})
    assert authenticate(Preamble("router1"), {"other": SECRET}) is None
    with pytest.raises(PreambleError, match="base64"):
        host_key_blob("ssh-ed25519 not*base64")


def test_a_non_ascii_hmac_is_a_wrong_hmac() -> None:
    # Found by coverage-guided fuzzing (tests/fuzz_coverage.py): hmac.compare_digest
    # raised TypeError on non-ASCII text, a traceback from what a device sent.
    for bad in ("\u00d70", "\ufffd" * 40, sha1_hmac(SECRET, HOST_KEY) + "\u00e9"):
        with pytest.raises(PreambleError, match="wrong HMAC"):
            authenticate(Preamble("router1", HOST_KEY, bad), {"router1": SECRET})


@pytest.mark.parametrize(("data", "why"), [
    (b"GET / HTTP/1.0\r\n\r\n", "neither an SSH version line"),
    (b"MSG-ID: DEVICE-CONN-INFO\r\nno colon here\r\n", "malformed preamble line"),
    (b"MSG-ID: OTHER\r\nMSG-VER: V1\r\nDEVICE-ID: r\r\n" + SSH, "unknown preamble MSG-ID"),
    (b"MSG-ID: DEVICE-CONN-INFO\r\nMSG-VER: V2\r\nDEVICE-ID: r\r\n" + SSH, "MSG-VER"),
    (b"MSG-ID: DEVICE-CONN-INFO\r\nMSG-VER: V1\r\n" + SSH, "without DEVICE-ID"),
    (preamble("bad name!") + SSH, "not a valid node name"),
    (preamble("r", host_key=HOST_KEY) + SSH, "without the other"),
    (preamble() + b"DEVICE-ID: again\r\n", "given twice"),
])
def test_malformed(data: bytes, why: str) -> None:
    parser = PreambleParser(Clock())
    with pytest.raises(PreambleError, match=why):
        parser.feed(data)


def test_oversized() -> None:
    parser = PreambleParser(Clock())
    assert parser.feed(b"MSG-ID: DEVICE-CONN-INFO\r\n") is None
    with pytest.raises(PreambleError, match=f"longer than {MAX_PREAMBLE}"):
        for _ in range(MAX_PREAMBLE // 16 + 2):
            parser.feed(b"X-PAD: " + b"a" * 7 + b"\r\n")
    # One endless line without a newline is cut off too.
    endless = PreambleParser(Clock())
    with pytest.raises(PreambleError, match="longer than"):
        for _ in range(MAX_PREAMBLE // 1000 + 2):
            endless.feed(b"M" * 1000)


def test_slow() -> None:
    clock = Clock()
    parser = PreambleParser(clock)
    assert parser.feed(b"MSG-ID: DEVICE-CONN-INFO\r\n") is None
    clock.advance(9.9)
    assert not parser.expired() and parser.feed(b"MSG-VER: V1\r\n") is None
    clock.advance(0.1)
    assert parser.expired() and parser.deadline == 10.0
    with pytest.raises(PreambleError, match="within 10 s"):
        parser.feed(b"DEVICE-ID: router1\r\n" + SSH)


def test_identify_by_host_key(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 1000.0)
    key_a, key_b = b"host-key-a", b"host-key-b"
    closed = identify_with(reg, key_a, "router1", lambda name: False)
    assert (closed.action, closed.known) == ("refuse", False)
    assert "not on the [netconf] allow list" in closed.reason

    def identify(reg: Registry, key: bytes, device_id: str | None) -> Decision:
        return identify_with(reg, key, device_id, lambda name: True)

    new = identify(reg, key_a, None)
    assert (new.action, new.name) == ("pending", default_name(key_a))
    assert identify(reg, key_a, "router1").name == "router1"
    reg.register_netconf("router1", key_a, "fp-a", "test")
    assert reg.register_netconf("other", key_a, "fp-a", "test")[1] is False
    assert identify(reg, key_a, None).action == "pending"
    held = identify(reg, key_b, "router1")
    assert held.action == "refuse" and "held by another key" in held.reason
    reg.set_state("router1", "approved", "test")
    assert identify(reg, key_a, "whatever") == identify(reg, key_a, None)
    assert identify(reg, key_a, None).action == "approved"
    changed = identify(reg, key_b, "router1")
    assert changed.action == "refuse" and "host key changed" in changed.reason
    reg.register("site-a", b"device-login-key", "fp", "test")
    assert identify(reg, key_b, "site-a").action == "refuse"
    reg.set_state("router1", "revoked", "test")
    assert identify(reg, key_a, None).action == "refuse"
    assert reg.node("router1").kind == "netconf" and reg.node_by_host_key(key_b) is None


def _connect(tmp_path: Path, **options: str) -> tuple[MemoryReactorClock, StringTransport, object]:
    clock = MemoryReactorClock()
    # The test device may enrol (unknown devices must be on the allow list).
    (tmp_path / "callhomehub.toml").write_text('[netconf]\nallow = ["router*"]\n')
    hub = make_hub(tmp_path, clock, **options)
    factory = CallHomeFactory(hub.netconf_needs(), NetconfSessions(hub.registry, clock))
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 4334))
    assert proto is not None
    tr = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
    proto.makeConnection(tr)
    return clock, tr, proto


def test_protocol_closes_a_slow_device(tmp_path: Path) -> None:
    clock, tr, proto = _connect(tmp_path)
    proto.dataReceived(b"MSG-ID: DEVICE-CONN-INFO\r\n")  # type: ignore[attr-defined]
    clock.advance(9)
    assert not tr.disconnecting
    clock.advance(1)
    assert tr.disconnecting and tr.value() == b""


def test_protocol_closes_on_a_bad_preamble_and_starts_ssh_after_a_good_one(
        tmp_path: Path) -> None:
    _clock, tr, proto = _connect(tmp_path)
    proto.dataReceived(b"GET / HTTP/1.0\r\n")  # type: ignore[attr-defined]
    assert tr.disconnecting and tr.value() == b""

    (tmp_path / "2").mkdir()
    _clock, tr, proto = _connect(tmp_path / "2")
    proto.dataReceived(preamble() + SSH[:2])  # type: ignore[attr-defined]
    assert tr.value() == b""  # the hub waits for the device's version line
    proto.dataReceived(SSH[2:])  # type: ignore[attr-defined]
    assert tr.value().startswith(b"SSH-2.0-") and not tr.disconnecting


def test_protocol_gives_the_ssh_login_its_own_deadline(tmp_path: Path) -> None:
    clock, tr, proto = _connect(tmp_path)
    clock.advance(9)
    proto.dataReceived(preamble() + SSH)  # type: ignore[attr-defined]
    clock.advance(LOGIN_TIMEOUT - 1)  # past the preamble's 10 s: that deadline is gone
    assert not tr.disconnecting
    clock.advance(1)
    assert tr.disconnecting
