"""Who may create entries from the NETCONF call-home port, in memory: the hub's
CallHomeFactory and a Conch SSH server playing the device, joined by iosim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from memory_hub import make_hub, new_key
from twisted.conch.ssh import keys
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent
from twisted.test.iosim import FakeTransport, connect

from hub.errors import NotFound
from hub.netconf.callhome import CallHomeFactory
from hub.netconf.devices import NetconfSessions
from hub.ssh.testing import makeServerFactory


def preamble(device: str) -> bytes:
    return (f"MSG-ID: DEVICE-CONN-INFO\r\nMSG-VER: V1\r\nDEVICE-ID: {device}\r\n").encode()


class Site:
    def __init__(self, tmp_path: Path, config: str = "") -> None:
        (tmp_path / "callhomehub.toml").write_text(config)
        self.clock = MemoryReactorClock()
        self.hub = make_hub(tmp_path, self.clock)
        self.factory = CallHomeFactory(self.hub.netconf_needs(),
                                       NetconfSessions(self.hub.registry, self.clock))

    def call_home(self, host_key: keys.Key, device_id: str | None,
                  peer: str = "127.0.0.5") -> tuple[Any, Any]:
        """One call home; (the hub's protocol or None if refused at once, the device)."""
        addr = IPv4Address("TCP", peer, 50000)
        hub_side = self.factory.buildProtocol(addr)
        if hub_side is None:
            return None, None
        device = makeServerFactory(host_key, b"root", self.hub.keys.mgmt.public(),
                                   self.clock).buildProtocol(addr)
        pump = connect(device, FakeTransport(device, isServer=False),
                       hub_side, FakeTransport(hub_side, isServer=True, peerAddress=addr),
                       greet=False)
        if device_id is not None:
            hub_side.dataReceived(preamble(device_id))
        for _ in range(30):
            pump.pump()
        return hub_side, device

    def names(self) -> set[str]:
        return {n.name for n in self.hub.registry.nodes()}


def test_unknown_devices_create_nothing_by_default(tmp_path: Path,
                                                   logged: list[LogEvent]) -> None:
    site = Site(tmp_path)
    for i in range(30):  # 30 devices in a moment, one source
        site.call_home(new_key(), f"squat-{i}")
        site.clock.advance(0.1)
    site.call_home(new_key(), None)  # no preamble: named by its host key
    assert site.names() == set()
    refusals = [formatEvent(e) for e in logged
                if "netconf call home from" in formatEvent(e) and "refused" in formatEvent(e)]
    assert 1 <= len(refusals) <= 2, refusals  # rate-limited, not one line per device
    assert "not on the [netconf] allow list" in refusals[0]
    # The name stays free for a device that registers over SSH later.
    site.hub.registry.register("squat-3", b"device-key", "fp", "test")
    assert "squat-3" in site.names()


def test_allow_list_and_known_devices(tmp_path: Path) -> None:
    site = Site(tmp_path, '[netconf]\nallow = ["router*", "netconf-*"]\n')
    router = new_key()
    site.call_home(router, "router1")
    assert site.hub.registry.node("router1").state == "pending"
    site.call_home(new_key(), "switch1")  # not on the list
    with pytest.raises(NotFound):
        site.hub.registry.node("switch1")
    plain = new_key()
    site.call_home(plain, None)
    assert [n for n in site.names() if n.startswith("netconf-")]
    # A known device comes back with any DEVICE-ID: identified by its host key.
    site.hub.registry.set_state("router1", "approved", "test")
    (tmp_path / "2").mkdir()
    site2 = Site(tmp_path / "2", "")
    site2.hub.registry.register_netconf("core1", router.public().blob(), "fp", "test")
    hub_side, _ = site2.call_home(router, "core1")
    assert hub_side.client is not None and hub_side.client.decision.name == "core1"


def test_unknown_devices_are_rate_limited_per_source(tmp_path: Path,
                                                     logged: list[LogEvent]) -> None:
    site = Site(tmp_path, '[netconf]\nallow = ["*"]\nunknown_per_minute = 5\n')
    for i in range(30):
        site.call_home(new_key(), f"dev-{i}")
    assert len(site.names()) == 5
    site.call_home(new_key(), "other-1", peer="127.0.0.6")  # another source has its own
    assert "other-1" in site.names()
    limited = [formatEvent(e) for e in logged if "too many unknown" in formatEvent(e)
               and "netconf call home from" in formatEvent(e)]
    assert len(limited) == 1
    site.clock.advance(12)  # 5 a minute: one more after 12 s
    site.call_home(new_key(), "dev-late")
    assert "dev-late" in site.names()


def test_a_claim_on_an_existing_name_is_logged_apart_from_the_strangers(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    site = Site(tmp_path, '[netconf]\nallow = ["router1"]\n')
    site.hub.registry.register_netconf("router1", new_key().public().blob(), "fp", "test")
    site.hub.registry.set_state("router1", "approved", "test")
    for i in range(3):
        site.call_home(new_key(), f"stranger-{i}")
    site.call_home(new_key(), "router1")
    lines = [formatEvent(e) for e in logged if "netconf call home from" in formatEvent(e)
             and "refused" in formatEvent(e)]
    assert len(lines) == 2 and "device host key changed" in lines[1]


class HeldCalls:
    """The hub's registry calls, answered when the test says (a registry far away)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.held: list[tuple[Any, tuple[Any, ...], Any]] = []

    def call(self, fn: Any, *args: Any) -> Any:
        from twisted.internet import defer

        done: defer.Deferred[Any] = defer.Deferred()
        self.held.append((fn, args, done))
        return done

    def write(self, fn: Any, *args: Any) -> None:
        self.inner.write(fn, *args)

    def refresh(self, fn: Any, *args: Any) -> None:
        self.inner.refresh(fn, *args)

    def answer(self) -> None:
        fn, args, done = self.held.pop(0)
        self.inner.call(fn, *args).chainDeferred(done)


def test_a_device_id_is_looked_up_off_the_reactor_and_its_bytes_wait(tmp_path: Path,
                                                                      logged: list[LogEvent]
                                                                      ) -> None:
    (tmp_path / "callhomehub.toml").write_text("")
    site = Site(tmp_path)
    site.hub.registry.register("router9", b"device-key", "fp", "test")
    held = HeldCalls(site.hub.calls)
    site.hub.calls = held  # type: ignore[assignment]
    site.factory = CallHomeFactory(site.hub.netconf_needs(),
                                   NetconfSessions(site.hub.registry, site.clock))
    hub_side, _ = site.call_home(new_key(), "router9")
    # Not on the allow list: SSH waits for the lookup of the name, with the
    # device's bytes (its SSH version line) held meanwhile.
    assert hub_side.client is None and [fn.__name__ for fn, _, _ in held.held] == ["node"]
    held.answer()
    assert hub_side.client is not None
    assert hub_side.client.otherVersionString.startswith(b"SSH-2.0-")  # the held bytes
    # An unknown name: refused once looked up, before any SSH.
    other, _ = site.call_home(new_key(), "squat-1", peer="127.0.0.6")
    assert other.client is None
    held.answer()
    assert other.client is None and other.transport.disconnecting
    assert any("unknown device squat-1 is not on the [netconf] allow list" in formatEvent(e)
               for e in logged)
