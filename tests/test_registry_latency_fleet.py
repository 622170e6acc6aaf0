"""Two peered hubs on a registry 50 ms away: no registry statement on the reactor (issue 17).

Hubs A and B, built by the service wiring with `--peer` on the real reactor, share
one registry file whose connections wait 50 ms before each statement
(`SlowRegistry` of test_registry_latency). Devices call home to hub A; hub B finds
them in its view of the fleet, dials them through its peer connection to A (A
checks B's peer key) and gets bytes echoed; both hubs beat and reclaim a dead
hub's node. Not one registry statement may run on the reactor thread meanwhile.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pytest_twisted
import test_registry_latency as slow
from attrs import evolve
from twisted.application import service
from twisted.internet import defer, reactor, task

from hub.access.auth import CALLHOME_PASSWORD, hash_password
from hub.access.gateway import JumpDeviceChannel
from hub.app.config import build_config
from hub.app.context import Hub
from hub.app.peering import HeartbeatService, add_peering
from hub.app.service import ListenerService, build_hub, build_ssh_factory
from hub.cluster.remote import RemoteTunnel
from hub.store.offthread import RegistryThread
from hub.store.registry import Registry


class Probe(JumpDeviceChannel):
    """A channel dialled to a device through a tunnel; keeps what comes back."""

    def __init__(self) -> None:
        JumpDeviceChannel.__init__(self)
        self.received = b""

    def dataReceived(self, data: Any) -> None:
        self.received += bytes(data)


def fleet_hub(tmp_path: Path, hub_id: str, registry: str | None) -> tuple[Hub, Any]:
    data = tmp_path / hub_id
    data.mkdir()
    (data / "callhomehub.toml").write_text(f'[cluster]\nid = "{hub_id}"\n')
    config = build_config({"data": str(data), "keepalive": "0.5", "web": "none",
                           "peer": "tcp:0:interface=127.0.0.1"})
    if registry is not None:
        config = evolve(config, registry_url=registry)  # the other hub's SQLite file
    hub = build_hub(config, reactor, registry_type=slow.SlowRegistry)
    top = service.MultiService()
    add_peering(top, hub, reactor, ListenerService)
    return hub, top


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await task.deferLater(reactor, 0.02)


@pytest_twisted.ensureDeferred
async def test_two_peered_hubs_run_no_registry_statement_on_the_reactor(
        tmp_path: Path) -> None:
    a, top_a = fleet_hub(tmp_path, "hub-a", None)
    b, top_b = fleet_hub(tmp_path, "hub-b", a.config.db_path)
    calls_a, calls_b = a.calls, b.calls
    assert isinstance(calls_a, RegistryThread) and isinstance(calls_b, RegistryThread)
    # A hub that died long ago, still holding a node: the live hubs reclaim it.
    dead = Registry(a.config.db_path, now=lambda: 1000.0)
    dead.hub_id = "hub-c"
    dead.hub_started("hub-c", "127.0.0.1:9", "ssh-ed25519 AAAA c")
    dead.register("old-node", b"key", "fp", "test")
    dead.mark_online("old-node", "192.0.2.9")
    dead.close()
    calls_a.startService()
    calls_b.startService()
    await calls_a.call(Registry.set_setting, CALLHOME_PASSWORD,
                       hash_password(b"secret", rounds=4), "test")
    factory = build_ssh_factory(a)
    factory.startFactory()
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore
    port = listening.getHost().port
    polls = [task.LoopingCall(hub.sync) for hub in (a, b)]
    beats = [s.heartbeat for top in (top_a, top_b) for s in top
             if isinstance(s, HeartbeatService)]
    probe = slow.LagProbe()
    gc.collect()
    gc.freeze()
    slow.watching = True
    probe.start()
    try:
        for top in (top_a, top_b):
            top.privilegedStartService()
            top.startService()
        for poll in polls:
            poll.start(0.25)
        names = [f"dev-{i}" for i in range(slow.DEVICES)]
        enrolled = await defer.gatherResults([
            defer.ensureDeferred(slow.enroll(port, calls_a, name)) for name in names])
        # Hub B learns where the nodes are from its polls, and routes to hub A.
        def routed(name: str) -> bool:
            tunnel = b.sessions.get(name)
            return isinstance(tunnel, RemoteTunnel) and len(list(tunnel.table)) == 1

        await until(lambda: all(routed(n) for n in names))
        probes: list[Probe] = []
        for name in names:
            tunnel = b.sessions.get(name)
            assert isinstance(tunnel, RemoteTunnel) and tunnel.hub == "hub-a"
            [forward] = tunnel.table
            chan = Probe()
            await tunnel.dial(forward.service, chan)
            chan.write(f"through hub b to {name}".encode())
            probes.append(chan)
        await until(lambda: all(p.received == f"through hub b to {n}".encode()
                                for p, n in zip(probes, names, strict=True)))
        # A beat of each now (their loops beat every 5 s too, and may have reclaimed it).
        await defer.gatherResults([defer.maybeDeferred(beat.beat) for beat in beats])
        for _, _, tunnel in enrolled:
            tunnel.transport.loseConnection()
        await until(lambda: all(b.sessions.get(n) is None for n in names))
        lag, ticks = probe.phase()
    finally:
        slow.watching = False
        gc.unfreeze()
        probe.stop()
        for poll in polls:
            if poll.running:
                poll.stop()
        await listening.stopListening()
        for top in (top_b, top_a):
            await top.stopService()
        await calls_b.stopService()
        await calls_a.stopService()
        factory.stopFactory()
    print(f"\nreactor lag, worst: {lag * 1000:.1f} ms ({ticks} ticks) while {slow.DEVICES} "
          f"devices called home to hub A and were reached through hub B; registry "
          f"statements wait {slow.DELAY * 1000:.0f} ms")
    assert slow.ON_THE_REACTOR == []  # not one registry statement on the reactor thread
    assert lag < slow.MAX_LAG
    registry = Registry(a.config.db_path, now=time.time)
    assert not registry.node("old-node").online
    [reclaim] = [e for e in registry.audit_log() if e.action == "hub-reclaim"]
    assert reclaim.actor in ("hub:hub-a", "hub:hub-b")
    assert {h.id: h.heartbeat for h in registry.hubs()}.keys() == {"hub-a", "hub-b", "hub-c"}
