"""The port keeper with the real reactor and a real keeper process."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from hub.tunnel.keeper import PortKeeper


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)  # type: ignore[union-attr]


class EchoFactory(protocol.Factory):
    protocol = Echo

    def __init__(self) -> None:
        self.peers: list[Any] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        self.peers.append(addr)
        return super().buildProtocol(addr)


def gone(pid: int) -> bool:
    """The process has exited (a zombie, or reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def sleep(seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    await d


async def until(check: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await sleep(0.02)
    raise AssertionError("timed out")


class Talk(protocol.Protocol):
    """Sends `data`, collects what comes back until `size` bytes or the close."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size, self.got = data, size, b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.size:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback(self.got)


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """A client on the reactor, not in a thread: the reactor's thread pool is the
    hub's (bcrypt), and a busy pool would hold the client back without a deadline.
    The deadline covers a keeper's start (0.4 s at a load of 9 on two cores)."""
    talk = Talk(data, len(b"echo:" + data))
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=int(timeout))
    await connectProtocol(endpoint, talk)
    talk.done.addTimeout(timeout, reactor)
    return await talk.done


def listen(kept: PortKeeper, factory: Any) -> Any:
    """A listener on a port the kernel picks as it binds: a port picked first and
    bound later can be taken meanwhile by another process on a busy machine
    (seen: EADDRINUSE under load)."""
    return kept.listenTCP(0, factory, interface="127.0.0.1")


@pytest.fixture
def keeper() -> Iterator[tuple[PortKeeper, list[str]]]:
    lost: list[str] = []
    kept = PortKeeper(reactor, on_lost=lost.append)
    kept.start()
    yield kept, lost
    kept.stop()


@pytest_twisted.ensureDeferred
async def test_connections_reach_the_factory_and_the_hub_holds_no_listener(
        keeper: tuple[PortKeeper, list[str]]) -> None:
    kept, _ = keeper
    before = open_fds()
    factory = EchoFactory()
    listening = listen(kept, factory)
    port = listening.getHost().port
    assert port != 0
    assert await exchange(port, b"hello") == b"echo:hello"
    assert factory.peers[0].host == "127.0.0.1"
    # The accepted copy is closed too: nothing open now that was not open before
    # (a descriptor of something else may have closed meanwhile).
    await until(lambda: open_fds() <= before)
    await listening.stopListening()
    # The port is free once stopListening fires: it binds again at once (SO_REUSEADDR:
    # the exchange may have left TIME_WAIT on it; a listener would fail listen()).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest_twisted.ensureDeferred
async def test_a_taken_port_fails_as_listen_tcp_does(
        keeper: tuple[PortKeeper, list[str]]) -> None:
    kept, _ = keeper
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(CannotListenError) as failure:
            kept.listenTCP(taken.getsockname()[1], EchoFactory(), interface="127.0.0.1")
    assert failure.value.socketError.errno == errno.EADDRINUSE


@pytest_twisted.ensureDeferred
async def test_a_killed_keeper_is_replaced_and_its_ports_dropped(
        keeper: tuple[PortKeeper, list[str]]) -> None:
    kept, lost = keeper
    first = listen(kept, EchoFactory())
    port = first.getHost().port
    assert await exchange(port, b"a") == b"echo:a"
    old_pid = kept._process.pid
    os.kill(old_pid, signal.SIGKILL)
    await until(lambda: lost)
    assert "port keeper" in lost[0]
    await first.stopListening()  # fired: nothing is held any more
    await until(lambda: kept._control is not None and kept._process.pid != old_pid)
    # The old keeper's end of the socketpair closes before its listeners as it dies
    # (a loaded machine can preempt it in between): its port is free once it is gone.
    await until(lambda: gone(old_pid))
    again = kept.listenTCP(port, EchoFactory(), interface="127.0.0.1")
    assert await exchange(port, b"b") == b"echo:b"
    await again.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_keeper_starts_without_site_packages(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every forward waits for the keeper's start; it is standard library only, so it
    # runs its file with -I -S: no site-packages, .pth files or environment to
    # import through (about twice the start-up time under load with them).
    (tmp_path / "sitecustomize.py").write_text("raise SystemExit('site was run')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    lost: list[str] = []
    kept = PortKeeper(reactor, on_lost=lost.append)
    kept.start()
    try:
        port = listen(kept, EchoFactory()).getHost().port
        assert await exchange(port, b"quick") == b"echo:quick"
        assert lost == []
    finally:
        kept.stop()


@pytest_twisted.ensureDeferred
async def test_the_keeper_exits_with_the_hub(keeper: tuple[PortKeeper, list[str]]) -> None:
    kept, lost = keeper
    pid = kept._process.pid
    kept.stop()
    await until(lambda: gone(pid))
    assert lost == []  # a requested stop is no loss


def test_a_port_closed_before_the_keeper_had_it_is_closed_here() -> None:
    # Between a lost keeper and its successor, listens wait in the queue.
    kept = PortKeeper(MemoryReactorClock())
    waiting = listen(kept, EchoFactory())
    port = waiting.getHost().port
    other = listen(kept, EchoFactory())
    closed: list[object] = []
    waiting.stopListening().addCallback(closed.append)
    assert closed == [None]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again at once
    assert [m[:1] for m, _ in kept._out] == [b"K"] and kept._ports == {other.ident: other}
    kept.stop()


class Exploding(protocol.Factory):
    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        raise RuntimeError("a bug in one connection's protocol")


@pytest_twisted.ensureDeferred
async def test_a_failing_connection_is_logged_and_the_keeper_kept(
        keeper: tuple[PortKeeper, list[str]]) -> None:
    kept, lost = keeper
    bad = listen(kept, Exploding()).getHost().port
    good = listen(kept, EchoFactory()).getHost().port
    with socket.create_connection(("127.0.0.1", bad), timeout=10):
        pass
    assert await exchange(good, b"still") == b"echo:still"
    assert lost == []


@pytest_twisted.ensureDeferred
async def test_a_keeper_out_of_descriptors_reports_the_port_it_lost() -> None:
    limited = [sys.executable, "-c",
               "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20));"
               "from hub.tunnel.keeper_process import main; sys.exit(main())"]
    lost_ports: list[int] = []
    kept = PortKeeper(reactor, argv=limited, on_port_lost=lost_ports.append)
    kept.start()
    try:
        ports = [listen(kept, EchoFactory()).getHost().port for _ in range(12)]
        await until(lambda: lost_ports)
        assert set(lost_ports) < set(ports)
        # The ports it did take still work.
        held = [p for p in ports if p not in lost_ports]
        assert await exchange(held[0], b"x") == b"echo:x"
    finally:
        kept.stop()


class FailingSpawn:
    """The real reactor, but the first spawnProcess fails (EMFILE)."""

    def __init__(self) -> None:
        self.failures = 1

    def spawnProcess(self, *args: Any, **kw: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return reactor.spawnProcess(*args, **kw)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


@pytest_twisted.ensureDeferred
async def test_a_keeper_that_cannot_start_is_tried_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The sockets the keeper makes, to check it closed them: the whole process's
    # fd table is no measure while other tests' threads (pytest-xdist) open files.
    made: list[socket.socket] = []
    socketpair = socket.socketpair

    def recorded(*args: Any) -> tuple[socket.socket, socket.socket]:
        pair = socketpair(*args)
        made.extend(pair)
        return pair

    monkeypatch.setattr(socket, "socketpair", recorded)
    kept = PortKeeper(FailingSpawn())
    kept.start()
    try:
        # nothing leaked: both ends of the failed attempt are closed
        assert kept._control is None and made and all(s.fileno() == -1 for s in made)
        port = listen(kept, EchoFactory()).getHost().port  # waits for the keeper
        await until(lambda: kept._control is not None)
        assert await exchange(port, b"late") == b"echo:late"
    finally:
        kept.stop()


def test_a_connection_accepted_while_its_port_closes_is_not_taken() -> None:
    adopted: list[int] = []
    clock = MemoryReactorClock()
    clock.adoptStreamConnection = lambda fd, family, factory: adopted.append(fd)  # type: ignore[method-assign]
    kept = PortKeeper(clock)
    closing = listen(kept, EchoFactory())
    ours, keepers = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kept._control = ours  # as if a keeper held the port: the close waits for its answer
    kept._flush()
    closing.stopListening()
    assert not closing.stopListening().called
    kept._message(b"A" + closing.ident.to_bytes(4, "big"), [99], truncated=False)
    assert adopted == []
    kept._message(b"c" + closing.ident.to_bytes(4, "big"), [], truncated=False)
    assert closing.stopListening().called
    ours.close()
    keepers.close()
    kept._control = None


@pytest_twisted.ensureDeferred
async def test_the_listens_of_one_turn_go_to_the_keeper_in_one_message(
        keeper: tuple[PortKeeper, list[str]]) -> None:
    """Each send that wakes the keeper costs the hub a context switch: a reconnect
    storm's forwards of one reactor turn are handed over together."""
    kept, lost = keeper
    listening = [listen(kept, EchoFactory()) for _ in range(70)]
    assert len(kept._out) == 70  # nothing sent during the turn
    await until(lambda: not kept._out)
    for each in (listening[0], listening[63], listening[64], listening[69]):
        port = each.getHost().port
        assert await exchange(port, str(port).encode()) == f"echo:{port}".encode()
    await defer.gatherResults([each.stopListening() for each in listening])
    assert lost == [] and kept._ports == {}


def test_the_keeper_takes_each_record_of_a_message_in_order() -> None:
    """A message of several records: each K takes the next descriptor, one that
    came without it (the keeper out of descriptors) is refused with F, a C is
    confirmed with c."""
    from hub.tunnel.keeper_process import ERR, MSG, Keeper, with_fd

    hub_end, keeper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listeners = [socket.socket() for _ in range(2)]
    try:
        for each in listeners:
            each.bind(("127.0.0.1", 0))
            each.listen()
        keeper = Keeper(keeper_end)
        records = [MSG.pack(b"K", 1), MSG.pack(b"C", 9), MSG.pack(b"K", 2), MSG.pack(b"K", 3)]
        hub_end.sendmsg([b"".join(records)], with_fd(*(s.fileno() for s in listeners)))
        hub_end.shutdown(socket.SHUT_WR)
        assert keeper.from_hub() is False  # read all, then the hub's end closed
        assert {i: s.getsockname() for i, s in keeper.ports.items()} == {
            1: listeners[0].getsockname(), 2: listeners[1].getsockname()}
        answers = [hub_end.recv(64) for _ in range(2)]
        assert answers == [MSG.pack(b"c", 9), ERR.pack(b"F", 3, errno.EMFILE)]
        for sock in keeper.ports.values():
            sock.close()
    finally:
        for sock in (*listeners, hub_end, keeper_end):
            sock.close()
