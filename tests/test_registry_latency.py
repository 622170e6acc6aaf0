"""A registry 50 ms away must not stall the reactor (issue 17).

A hub built by the service wiring on the real reactor, on loopback, whose registry
connections (the registry thread's and the reactor side's) wait 50 ms before each
statement outside a transaction and before each transaction. Devices register,
call home with a forward, get bytes echoed through their tunnels and answer
keepalives while the registry is polled; a LoopingCall every 5 ms measures how
late the reactor runs it. Then everything must be in the registry, in order.
"""

from __future__ import annotations

import gc
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import channel, common, connection, keys, transport, userauth
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from hub.access.auth import CALLHOME_PASSWORD, hash_password
from hub.app.config import HubConfig, build_config
from hub.app.context import Hub
from hub.app.service import build_hub, build_ssh_factory
from hub.ssh.modern import ModernTransportMixin
from hub.store.offthread import RegistryThread
from hub.store.registry import Registry

DELAY = 0.05      # the database's round trip
DEVICES = 4
PROBE_EVERY = 0.005
# Every statement run on the reactor thread is caught by name (ON_THE_REACTOR); the
# lag bound catches the rest that would stall it. Alone, the worst lag is about 10 ms
# while four SSH handshakes run, 2-3 ms once they are done; the bound leaves room for
# the CI machine (2 cores, 3 test processes), where 40 ms was passed now and then.
# LagProbe takes out the time the reactor waited for a CPU, so a machine loaded by
# other work does not break the bound; a blocked or busy reactor still does.
# The calls on the reactor, as before the registry thread, made it 1,329 ms.
MAX_LAG = 0.100


# Statements run on the reactor thread while `watching` (none may be).
ON_THE_REACTOR: list[str] = []
watching = False


class SlowDb:
    """The registry's connection (hub.store.engine) 50 ms away: each statement
    outside a transaction and each transaction's BEGIN wait DELAY first."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self._in_tx = False

    def _wait(self, sql: str) -> None:
        if watching and threading.current_thread() is threading.main_thread():
            ON_THE_REACTOR.append(sql)
        if sql.startswith("BEGIN") or not self._in_tx:
            time.sleep(DELAY)

    def begin(self) -> None:
        self._wait("BEGIN")
        self._db.begin()
        self._in_tx = True

    def commit(self) -> None:
        self._in_tx = False
        self._db.commit()

    def rollback(self) -> None:
        self._in_tx = False
        self._db.rollback()

    def execute(self, sql: str, *args: Any) -> Any:
        self._wait(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._wait(sql)
        return self._db.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class SlowRegistry(Registry):
    """The registry over a connection 50 ms away (test only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._db = SlowDb(self._db)  # type: ignore[assignment]


def waited_for_cpu() -> float | None:
    """Seconds the calling thread has spent runnable but waiting for a CPU (the
    second field of /proc/thread-self/schedstat), or None where the kernel keeps
    no such count."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class LagProbe:
    """How late a 5 ms LoopingCall runs: the longest the reactor was held up.

    Time the reactor thread spent runnable but waiting for a CPU is taken out (where
    the kernel counts it): on a loaded machine the other processes' work delays
    every tick without the hub doing anything wrong, whereas a reactor blocked on a
    registry round trip, a lock or a long computation is late by the same amount
    however idle the machine is. `worst_wall` keeps the plain lateness."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 waited: Callable[[], float | None] = waited_for_cpu) -> None:
        self._clock, self._waited_for_cpu = clock, waited
        self.worst = 0.0
        self.worst_wall = 0.0
        self.ticks = 0
        self._last: float | None = None
        self._waited: float | None = None
        self._loop = task.LoopingCall(self._tick)

    def _tick(self) -> None:
        now, waited = self._clock(), self._waited_for_cpu()
        if self._last is not None:
            late = now - self._last - PROBE_EVERY
            self.worst_wall = max(self.worst_wall, late)
            if waited is not None and self._waited is not None:
                late -= waited - self._waited
            self.worst = max(self.worst, late)
        self._last, self._waited = now, waited
        self.ticks += 1

    def phase(self) -> tuple[float, int]:
        """The worst lag and the ticks since the last phase, and start a new one."""
        seen, self.worst, self.worst_wall, self.ticks = (self.worst, self.ticks), 0.0, 0.0, 0
        return seen

    def start(self) -> None:
        self._loop.start(PROBE_EVERY)

    def stop(self) -> None:
        self._loop.stop()


# -- a device over loopback TCP ------------------------------------------------------

class EchoChannel(channel.SSHChannel):
    """A forwarded-tcpip channel from the hub: what comes in goes back."""

    name = b"forwarded-tcpip"

    def dataReceived(self, data: bytes) -> None:
        self.write(data)

    def eofReceived(self) -> None:
        self.conn.sendEOF(self)

    def closed(self) -> None:
        self.loseConnection()


class DeviceConnection(connection.SSHConnection):
    def __init__(self) -> None:
        connection.SSHConnection.__init__(self)
        self.ready: defer.Deferred[DeviceConnection] = defer.Deferred()
        self.keepalives = 0

    def serviceStarted(self) -> None:
        connection.SSHConnection.serviceStarted(self)
        self.ready.callback(self)

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        if common.getNS(packet)[0] == b"keepalive@openssh.com":
            self.keepalives += 1
        connection.SSHConnection.ssh_GLOBAL_REQUEST(self, packet)

    def channel_forwarded_tcpip(self, window: int, max_packet: int, data: bytes) -> Any:
        return EchoChannel(remoteWindow=window, remoteMaxPacket=max_packet)


class DeviceAuth(userauth.SSHUserAuthClient):
    def __init__(self, key: keys.Key, password: bytes | None,
                 conn: DeviceConnection) -> None:
        userauth.SSHUserAuthClient.__init__(self, b"cms", conn)
        self.key: keys.Key | None = None if password else key
        self.private = key
        self.password = password

    def getPublicKey(self) -> Any:
        key, self.key = self.key, None
        return None if key is None else key.public()

    def getPrivateKey(self) -> Any:
        return defer.succeed(self.private)

    def getPassword(self, prompt: Any = None) -> Any:
        password, self.password = self.password, None
        return None if password is None else defer.succeed(password)


class DeviceTransport(ModernTransportMixin, transport.SSHClientTransport):
    rekeyTimeLimit = None

    def __init__(self, key: keys.Key, password: bytes | None) -> None:
        self.key, self.password = key, password
        self.conn = DeviceConnection()

    def verifyHostKey(self, pubKey: bytes, fingerprint: bytes) -> Any:
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(DeviceAuth(self.key, self.password, self.conn))


class RegisterChannel(channel.SSHChannel):
    name = b"session"

    def __init__(self, command: bytes, stdin: bytes, **kw: Any) -> None:
        channel.SSHChannel.__init__(self, **kw)
        self.command, self.stdin = command, stdin
        self.status: int | None = None
        self.err = b""
        self.done: defer.Deferred[int | None] = defer.Deferred()

    def channelOpen(self, specificData: bytes) -> None:
        self.conn.sendRequest(self, b"exec", common.NS(self.command))
        self.write(self.stdin)
        self.conn.sendEOF(self)

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.err += data

    def request_exit_status(self, data: bytes) -> int:
        (self.status,) = struct.unpack(">L", data[:4])
        return 1

    def closed(self) -> None:
        self.loseConnection()
        if not self.done.called:
            self.done.callback(self.status)


class Echoed(protocol.Protocol):
    """Sends `payload` through an SDT port and fires with the round trip."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.got = payload, b""
        self.done: defer.Deferred[float] = defer.Deferred()

    def connectionMade(self) -> None:
        self.start = time.monotonic()
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if self.got == self.payload:
            self.done.callback(time.monotonic() - self.start)
            self.transport.loseConnection()


async def connect(port: int, key: keys.Key, password: bytes | None = None) -> DeviceTransport:
    device = DeviceTransport(key, password)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), device)
    await device.conn.ready
    return device


async def enroll(port: int, hub_calls: RegistryThread, name: str) -> tuple[keys.Key, int]:
    """Register `name`, have it approved, call home with a forward; (key, SDT port)."""
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    device = await connect(port, key, b"secret")
    chan = RegisterChannel(b"register " + name.encode(), key.public().toString("openssh"))
    device.conn.openChannel(chan)
    status = await chan.done
    assert status == 0, chan.err
    device.transport.loseConnection()
    await hub_calls.call(Registry.set_state, name, "approved", "test")
    tunnel = await connect(port, key)
    answer = await tunnel.conn.sendGlobalRequest(
        b"tcpip-forward", common.NS(b"") + struct.pack(">L", 0), wantReply=1)
    (sdt,) = struct.unpack(">L", answer[:4])
    return key, sdt, tunnel  # type: ignore[return-value]


async def echo(sdt: int, payload: bytes) -> float:
    echoed = Echoed(payload)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", sdt), echoed)
    return await echoed.done


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await task.deferLater(reactor, 0.05)


async def slow_hub(config: HubConfig) -> tuple[Hub, RegistryThread]:
    """A hub whose registry statements take DELAY each, its registry thread started
    and the Call Home Password set."""
    hub = build_hub(config, reactor, registry_type=SlowRegistry)
    calls = hub.calls
    assert isinstance(calls, RegistryThread)
    calls.startService()
    await calls.call(Registry.set_setting, CALLHOME_PASSWORD,
                     hash_password(b"secret", rounds=4), "test")
    return hub, calls


@pytest_twisted.ensureDeferred
async def test_a_registry_50_ms_away_never_stalls_the_reactor(tmp_path: Path) -> None:
    config = build_config({"data": str(tmp_path), "keepalive": "0.5", "web": "none"})
    hub, calls = await slow_hub(config)
    factory = build_ssh_factory(hub)
    factory.startFactory()
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore
    port = listening.getHost().port
    poll = task.LoopingCall(hub.sync)
    probe = LagProbe()
    # What the test process has piled up (a whole suite's objects) is not the hub's:
    # kept out of the collector's full passes while the reactor is measured.
    gc.collect()
    gc.freeze()
    global watching
    watching = True
    probe.start()
    poll.start(0.25)
    try:
        names = [f"dev-{i}" for i in range(DEVICES)]
        enrolled = await defer.gatherResults([
            defer.ensureDeferred(enroll(port, calls, name)) for name in names])
        enrolling = probe.phase()
        trips = await defer.gatherResults([
            defer.ensureDeferred(echo(sdt, f"bytes through {name}".encode() * 100))
            for name, (_, sdt, _) in zip(names, enrolled, strict=True)])
        await task.deferLater(reactor, 1.6)  # keepalives go out and are answered
        tunnels = [tunnel for _, _, tunnel in enrolled]
        assert all(t.conn.keepalives >= 2 for t in tunnels)
        trips += await defer.gatherResults([
            defer.ensureDeferred(echo(sdt, b"again" * 1000)) for _, sdt, _ in enrolled])
        for tunnel in tunnels:
            tunnel.transport.loseConnection()

        async def all_offline() -> bool:
            nodes = await calls.call(Registry.nodes)
            return not any(n.online or n.live for n in nodes)

        await until(all_offline)
        steady = probe.phase()
    finally:
        watching = False
        gc.unfreeze()
        probe.stop()
        poll.stop()
        await listening.stopListening()
        await calls.stopService()
        factory.stopFactory()
    print(f"\nreactor lag, worst: {enrolling[0] * 1000:.1f} ms while {DEVICES} devices "
          f"registered and called home ({enrolling[1]} ticks), {steady[0] * 1000:.1f} ms "
          f"through echoes, keepalives, polls and hang-ups ({steady[1]} ticks); echo round "
          f"trips {min(trips) * 1000:.1f}-{max(trips) * 1000:.1f} ms; registry statements "
          f"wait {DELAY * 1000:.0f} ms")
    assert ON_THE_REACTOR == []  # not one registry statement on the reactor thread
    assert enrolling[0] < MAX_LAG and steady[0] < MAX_LAG
    assert max(trips) < 10 * DELAY  # no trip waits behind a queue of registry calls

    registry = Registry(config.db_path, now=time.time)  # all written, in order
    for name in names:
        actions = [e.action for e in registry.audit_log() if e.target == name]
        # Another lease follows only where another program held the port leased.
        assert actions[:3] == ["register", "approve", "lease"], (name, actions)
        assert set(actions[3:]) <= {"lease"}, (name, actions)
        node = registry.node(name)
        assert not node.online and node.forwards and not node.live


@pytest_twisted.ensureDeferred
async def test_the_lag_probe_counts_a_blocked_or_busy_reactor_whatever_the_load() -> None:
    """The probe behind the lag bounds: a reactor that sleeps (as on a registry round
    trip) or computes for 150 ms is that late, with time waiting for a CPU taken out."""
    probe = LagProbe()
    probe.start()
    try:
        await task.deferLater(reactor, 0.05)
        assert probe.phase()[0] < 0.15
        await task.deferLater(reactor, 0.01, time.sleep, 0.15)
        await task.deferLater(reactor, 0.02)
        blocked, ticks = probe.phase()

        def spin() -> None:  # 150 ms of the reactor thread's own CPU
            start = time.thread_time()
            while time.thread_time() - start < 0.15:
                pass

        await task.deferLater(reactor, 0.01, spin)
        await task.deferLater(reactor, 0.02)
        busy, _ = probe.phase()
    finally:
        probe.stop()
    assert ticks >= 2
    assert blocked >= 0.15 - PROBE_EVERY
    assert busy >= 0.15 - PROBE_EVERY


def test_the_lag_probe_takes_out_only_the_waits_for_a_cpu() -> None:
    now, waited = [100.0], [7.0]
    probe = LagProbe(clock=lambda: now[0], waited=lambda: waited[0])
    probe._tick()
    now[0] += PROBE_EVERY + 0.080  # 80 ms late, 70 of them waiting for a CPU
    waited[0] += 0.070
    probe._tick()
    assert abs(probe.worst - 0.010) < 1e-9 and abs(probe.worst_wall - 0.080) < 1e-9
    now[0] += PROBE_EVERY + 0.060  # 60 ms late, none of it waiting: blocked
    probe._tick()
    assert abs(probe.worst - 0.060) < 1e-9
    worst, ticks = probe.phase()
    assert abs(worst - 0.060) < 1e-9 and ticks == 3
    assert probe.worst == probe.worst_wall == 0.0 and probe.ticks == 0
    blind = LagProbe(clock=lambda: now[0], waited=lambda: None)  # no schedstat
    blind._tick()
    now[0] += PROBE_EVERY + 0.040
    blind._tick()
    assert abs(blind.worst - 0.040) < 1e-9 and blind.worst_wall == blind.worst
