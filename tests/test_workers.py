"""`--workers N` without processes: the shared socket, the options, a worker's command
line and service tree, and worker 0's supervision on a MemoryReactorClock."""

from __future__ import annotations

import errno
import io
import os
import socket
import sys
from pathlib import Path

import pytest
from twisted.internet import error
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    LogEvent,
    Logger,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python.failure import Failure

from hub.app.config import workers_option
from hub.app.datalock import DataLockService
from hub.app.logs import HeldWrites
from hub.app.service import Options, makeService
from hub.app.sharedport import SharedListenerService, TcpListen, parse_tcp_listen, shared_socket
from hub.app.worker import (
    LOG_BATCH_DELAY,
    ParentWatch,
    json_observer,
    make_worker_service,
)
from hub.app.workers import (
    FIGURES_REQUEST,
    FIGURES_TIMEOUT,
    RESTART_MAX,
    STABLE,
    WorkerProtocol,
    WorkerSupervisor,
    default_workers,
    restart_delay,
    worker_arguments,
)
from hub.errors import ConfigError, HubError
from hub.rules.figures import Figure
from hub.store.registry import Registry


def test_tcp_endpoints_are_parsed_and_others_are_not_shareable() -> None:
    assert parse_tcp_listen("tcp:22") == TcpListen(22)
    assert parse_tcp_listen("tcp:0:interface=127.0.0.1") == TcpListen(0, "127.0.0.1")
    assert parse_tcp_listen("tcp:port=2222:backlog=200") == TcpListen(2222, "", 200)
    assert parse_tcp_listen("tcp:22:interface=\\:\\:1") == TcpListen(22, "::1")
    assert parse_tcp_listen("tcp:22:interface=\\:\\:1").family == socket.AF_INET6  # type: ignore[union-attr]
    for other in ("unix:/run/hub.sock", "ssl:22", "systemd:domain=INET:index=0", "tcp:x",
                  "tcp:22:reuse=1", "tcp:70000", "tcp6:22"):
        assert parse_tcp_listen(other) is None, other
    listen = TcpListen(0, "::1", 200)
    assert parse_tcp_listen(listen.endpoint(2222)) == TcpListen(2222, "::1", 200)


def test_processes_can_share_a_port_that_a_plain_socket_does_not_let_go() -> None:
    first = shared_socket(TcpListen(0, "127.0.0.1"))
    port = first.getsockname()[1]
    with first, shared_socket(TcpListen(port, "127.0.0.1")) as second:
        assert second.getsockname()[1] == port
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(OSError) as taken:
            shared_socket(TcpListen(plain.getsockname()[1], "127.0.0.1"))
    assert taken.value.errno == errno.EADDRINUSE


def test_the_shared_listener_is_adopted_and_tells_the_port_it_bound() -> None:
    reactor = MemoryReactorClock()
    listener = SharedListenerService("SSH", TcpListen(0, "127.0.0.1"), "factory", reactor)
    listener.privilegedStartService()
    [(_fd, family, factory)] = reactor.adoptedPorts
    assert (family, factory) == (socket.AF_INET, "factory")
    assert listener.bound > 0 and listener.endpoint() == f"tcp:{listener.bound}:interface=127.0.0.1"
    listener.stopService()


def test_a_taken_port_stops_the_shared_listener_with_one_line() -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        listener = SharedListenerService("SSH", TcpListen(port, "127.0.0.1"), None,
                                         MemoryReactorClock())
        with pytest.raises(SystemExit) as stopped:
            listener.privilegedStartService()
    assert str(stopped.value).startswith(
        f"callhomehub: cannot listen on tcp:{port}:interface=127.0.0.1 (SSH): ")


def test_workers_default_to_the_cores_and_only_tcp_endpoints_are_shared() -> None:
    assert workers_option(None, "tcp:22") == default_workers() == len(os.sched_getaffinity(0))
    assert workers_option(None, "unix:/run/hub.sock") == 1
    assert workers_option("3", "tcp:22") == 3
    assert workers_option("1", "unix:/run/hub.sock") == 1
    with pytest.raises(ConfigError) as refused:
        workers_option("2", "unix:/run/hub.sock")
    assert str(refused.value) == (
        "--workers 2: --ssh unix:/run/hub.sock cannot be shared between processes; use a "
        "tcp:PORT[:interface=ADDRESS] endpoint or --workers 1")
    for bad, said in (("0", "must be 1 to 256, got 0"), ("x", "expected a number")):
        with pytest.raises(ConfigError, match=said):
            workers_option(bad, "tcp:22")


def test_a_bad_workers_option_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        Options().parseOptions(["--data", str(tmp_path), "--workers", "0"])
    assert str(stopped.value) == "callhomehub: --workers: must be 1 to 256, got 0"


def test_a_workers_command_line_is_the_hubs_options_with_the_bound_port(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--data", "state", "--workers", "4", "--keepalive", "5",
                          "--port-keeper", "--ssh", "tcp:0:interface=127.0.0.1"])
    args = worker_arguments(options, Options.optParameters, Options.optFlags, 3,
                            "tcp:2222:interface=127.0.0.1")
    assert args[:5] == [sys.executable, "-P", "-m", "hub.app.worker", "3"]
    assert f"--data={tmp_path / 'state'}" in args and "--keepalive=5" in args
    assert "--port-keeper" in args
    assert args[-2:] == ["--ssh=tcp:2222:interface=127.0.0.1", "--workers=1"]
    assert not any(a.startswith("--ssh=tcp:0") or a == "--workers=4" for a in args)
    again = Options()
    again.parseOptions(args[5:])  # what the worker parses
    assert again.hub_config.keepalive == 5 and again.hub_config.port_keeper
    assert again.hub_config.workers == 1


def test_restart_back_off_doubles_to_a_cap() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, RESTART_MAX, RESTART_MAX]


class FakeProcess:
    """What spawnProcess returns, enough for the supervisor: a pid and signals."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.written: list[bytes] = []  # to its stdin

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Spawner:
    def __init__(self) -> None:
        self.started: list[tuple[ProcessProtocol, list[str], FakeProcess]] = []

    def __call__(self, proto: ProcessProtocol, argv: list[str]) -> FakeProcess:
        process = FakeProcess(100 + len(self.started))
        self.started.append((proto, argv, process))
        return process

    def end(self, n: int, why: Exception) -> None:
        self.started[n][0].processEnded(Failure(why))


def killed() -> Exception:
    return error.ProcessTerminated(signal=9)


def test_a_dead_worker_is_logged_and_started_again_after_a_back_off(
        logged: list[LogEvent]) -> None:
    clock, spawn = MemoryReactorClock(), Spawner()
    supervisor = WorkerSupervisor(3, lambda i: ["worker", str(i)], spawn, clock)
    supervisor.startService()
    assert [argv for _p, argv, _x in spawn.started] == [["worker", "1"], ["worker", "2"]]
    clock.advance(5)
    spawn.end(0, killed())
    [line] = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert line == ("worker 1 (pid 100) was killed by signal 9 (SIGKILL) after 5.0 s; "
                    "starting it again in 1 s")
    clock.advance(0.9)
    assert len(spawn.started) == 2
    clock.advance(0.1)
    assert spawn.started[2][1] == ["worker", "1"]
    # Quick deaths in a row wait longer each time...
    spawn.end(2, error.ProcessTerminated(exitCode=3))
    assert "exited with status 3" in formatEvent(logged[-1])
    clock.advance(1.9)
    assert len(spawn.started) == 3
    clock.advance(0.1)
    assert len(spawn.started) == 4
    # ...and a worker that ran a while starts at the short delay again.
    clock.advance(STABLE)
    spawn.end(3, killed())
    clock.advance(1)
    assert len(spawn.started) == 5
    supervisor.stopService()


def test_stopping_the_hub_stops_every_worker_and_starts_none_again() -> None:
    clock, spawn = MemoryReactorClock(), Spawner()
    supervisor = WorkerSupervisor(3, lambda i: [str(i)], spawn, clock, grace=10)
    supervisor.startService()
    spawn.end(1, killed())  # worker 2 dies: a restart is pending
    stopped = supervisor.stopService()
    first = spawn.started[0][2]
    assert first.signals == ["TERM"] and not stopped.called
    clock.advance(10)
    assert first.signals == ["TERM", "KILL"]  # it did not go in time
    spawn.end(0, killed())
    assert stopped.called
    clock.advance(60)
    assert len(spawn.started) == 2  # nothing restarted


def test_a_workers_log_records_are_logged_with_its_index(logged: list[LogEvent]) -> None:
    clock, spawn = MemoryReactorClock(), Spawner()
    WorkerSupervisor(2, lambda i: [str(i)], spawn, clock).startService()
    proto = spawn.started[0][0]
    assert isinstance(proto, WorkerProtocol)
    record = eventAsJSON({"log_format": "forward {node} -> {port}", "node": "site-a",
                          "port": 50000, "log_level": LogLevel.info,
                          "log_namespace": "hub.tunnel.live", "log_time": 1.0})
    data = b"\x1e" + record.encode() + b"\n"
    proto.outReceived(data[:10])  # records may come in pieces
    proto.outReceived(data[10:])  # and the last one is logged at once
    proto.errReceived(b"Traceback (most recent call last):\n  Fi")
    proto.errReceived(b"le x\n")
    [forward] = [e for e in logged if e.get("worker") == 1]
    assert formatEvent(forward) == "forward site-a -> 50000"
    assert forward["log_system"] == "w1 hub.tunnel.live#info"
    assert forward["log_level"] == LogLevel.info
    errors = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert errors == ["worker 1 stderr: Traceback (most recent call last):",
                      "worker 1 stderr:   File x"]


def test_worker_0_shares_its_ssh_listener(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:0:interface=127.0.0.1",
                          "--metrics", "none", "--web", "none", "--workers", "2"])
    reactor = MemoryReactorClock()
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    assert len(reactor.adoptedPorts) == 1
    assert [s.endpoint() for s in top if isinstance(s, SharedListenerService)]
    assert [s.workers[0].index for s in top if isinstance(s, WorkerSupervisor)] == [1]
    for started in top:  # only these were started: no workers on a memory reactor
        if isinstance(started, (SharedListenerService, DataLockService)):
            started.stopService()


def test_a_worker_runs_the_ssh_listener_and_leaves_the_rest_to_worker_0(
        tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:0:interface=127.0.0.1",
                          "--workers", "1"])
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    registry.register("site-a", b"k", "fp", "cli")
    registry.mark_online("site-a", "192.0.2.1")  # held by another worker
    reactor = MemoryReactorClock()
    top = make_worker_service(options.hub_config, 1, reactor)
    top.privilegedStartService()
    top.startService()
    assert registry.node("site-a").online
    assert len(reactor.adoptedPorts) == 1
    assert reactor.tcpServers == [] and reactor.unixServers == []  # no web, metrics, control
    assert not (tmp_path / "hub.lock").exists()
    top.stopService()


def test_a_worker_refuses_an_endpoint_it_cannot_share(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "unix:" + str(tmp_path / "s"),
                          "--workers", "1"])
    with pytest.raises(HubError, match="a worker needs a tcp: endpoint"):
        make_worker_service(options.hub_config, 1, MemoryReactorClock())



def test_each_worker_is_a_hub_of_its_own_with_a_peer_listener() -> None:
    from hub.app.config import HubConfig, as_worker
    from hub.rules.cluster import is_sibling

    base = HubConfig(data="/d", cluster_id="edge-1", workers=2)
    first, second = as_worker(base, 0), as_worker(base, 1)
    assert (first.cluster_id, second.cluster_id) == ("edge-1-w0", "edge-1-w1")
    assert first.peer == second.peer == "tcp:0:interface=127.0.0.1"
    assert first.worker_group == second.worker_group == "edge-1"
    assert is_sibling("edge-1", "edge-1-w7") and not is_sibling("edge-1", "edge-2-w0")
    assert not is_sibling(None, "edge-1-w0")
    # Several machines: worker 0 keeps --peer and the configured address; the
    # others listen on that address's host and publish what they bound.
    fleet = as_worker(HubConfig(data="/d", cluster_id="x" * 63, workers=2,
                                peer="tcp:7000", peer_address="10.0.0.5:7000"), 3)
    assert fleet.peer == "tcp:0:interface=10.0.0.5" and fleet.peer_address is None
    assert fleet.cluster_id == "x" * 60 + "-w3"
    assert as_worker(HubConfig(data="/d", cluster_id="a", workers=2, peer="tcp:7000",
                               peer_address="10.0.0.5:7000"), 0).peer == "tcp:7000"


def test_a_scrape_asks_each_running_worker_once_and_adds_its_figures(tmp_path: Path) -> None:
    """Worker 0's /metrics asks the workers on their stdin; each answers among its log
    records (`ParentWatch`, the worker's end); a worker that does not answer in time
    counts with what it said last."""
    clock, spawn = MemoryReactorClock(), Spawner()
    supervisor = WorkerSupervisor(3, lambda i: [str(i)], spawn, clock)
    supervisor.startService()
    first = supervisor.ask_figures()
    second = supervisor.ask_figures()  # a scrape overlapping the first: no second question
    assert [p.written for _x, _a, p in spawn.started] == [[FIGURES_REQUEST]] * 2

    def answer(n: int, tunnels: float, to_device: float) -> None:
        out = io.StringIO()
        figures: list[Figure] = [
            ("gauge", "callhomehub_tunnels_online", {}, tunnels),
            ("counter", "callhomehub_tunnel_bytes_total", {"direction": "to_device"},
             to_device)]
        clock = MemoryReactorClock()
        clock.running = True  # log records are held meanwhile; the figures are not
        watch = ParentWatch(clock, lambda: figures, HeldWrites(out, clock, LOG_BATCH_DELAY))
        watch.dataReceived(FIGURES_REQUEST)
        log_record = "\x1e" + eventAsJSON({"log_format": "x", "log_level": LogLevel.info,
                                          "log_namespace": "t", "log_time": 1.0}) + "\n"
        data = (log_record + out.getvalue() + log_record).encode()
        spawn.started[n][0].outReceived(data[:7])
        spawn.started[n][0].outReceived(data[7:])

    answer(0, 3, 1000)
    assert not first.called  # worker 2 has not answered yet
    answer(1, 4, 500)
    assert first.called and second.called
    assert supervisor.figures.totals() == {
        ("callhomehub_tunnels_online", ()): 7,
        ("callhomehub_tunnel_bytes_total", (("direction", "to_device"),)): 1500}
    # Worker 2 stalls: the scrape goes on after FIGURES_TIMEOUT with what it said last.
    third = supervisor.ask_figures()
    answer(0, 2, 1100)
    clock.advance(FIGURES_TIMEOUT)
    assert third.called
    assert supervisor.figures.totals()[("callhomehub_tunnels_online", ())] == 6
    # Worker 1 dies: its tunnels are gone, its bytes still count; started again, it
    # counts from 0 and the total does not go down.
    spawn.end(0, killed())
    assert supervisor.figures.totals() == {
        ("callhomehub_tunnels_online", ()): 4,
        ("callhomehub_tunnel_bytes_total", (("direction", "to_device"),)): 1600}
    clock.advance(1)
    assert len(spawn.started) == 3
    supervisor.ask_figures()
    answer(2, 1, 10)
    clock.advance(FIGURES_TIMEOUT)
    assert supervisor.figures.totals() == {
        ("callhomehub_tunnels_online", ()): 5,
        ("callhomehub_tunnel_bytes_total", (("direction", "to_device"),)): 1610}
    supervisor.stopService()


def test_an_unreadable_figures_record_is_logged_and_the_scrape_goes_on(
        logged: list[LogEvent]) -> None:
    clock, spawn = MemoryReactorClock(), Spawner()
    supervisor = WorkerSupervisor(2, lambda i: [str(i)], spawn, clock)
    supervisor.startService()
    asked = supervisor.ask_figures()
    spawn.started[0][0].outReceived(b'\x1e{"callhomehub_figures":[["gauge"]]}\n')
    assert [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn] == [
        "worker 1: unreadable figures record (not enough values to unpack (expected 4, got "
        "1)): b'{\"callhomehub_figures\":[[\"gauge\"]]}'"]
    clock.advance(FIGURES_TIMEOUT)
    assert asked.called and supervisor.figures.totals() == {}
    supervisor.stopService()


class FlushCounting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_a_workers_log_records_go_to_worker_0_together(logged: list[LogEvent]) -> None:
    """One pipe write for a burst of records, not one per record."""
    clock, out = MemoryReactorClock(), FlushCounting()
    clock.running = True  # records are held while the reactor runs
    held = HeldWrites(out, clock, LOG_BATCH_DELAY)
    log = Logger(observer=json_observer(LogLevel.info, held), namespace="hub.tunnel.live")
    for node in ("site-a", "site-b", "site-c"):
        log.info("node {node} online", node=node)
    assert out.flushes == 0
    clock.advance(LOG_BATCH_DELAY)
    assert out.flushes == 1
    log.info("node {node} offline", node="site-a")
    held.flush_now()  # as the reactor stops
    assert out.flushes == 2 and not clock.getDelayedCalls()
    spawn = Spawner()
    WorkerSupervisor(2, lambda i: [str(i)], spawn, clock).startService()
    spawn.started[0][0].outReceived(out.getvalue().encode())
    assert [formatEvent(e) for e in logged if e.get("worker") == 1] == [
        "node site-a online", "node site-b online", "node site-c online", "node site-a offline"]


def test_a_workers_lines_are_formatted_by_the_worker_and_logged_unchanged(
        logged: list[LogEvent]) -> None:
    """A worker sends its event's text (a traceback included), not the whole event
    as twisted.logger's JSON: worker 0 writes the same line as for the event itself,
    without decoding it (encoding and decoding the events was 4-5 % of each worker's
    time in a reconnect storm)."""
    out = io.StringIO()
    log = Logger(observer=json_observer(LogLevel.info, out), namespace="hub.access.userauth")
    try:
        raise ValueError("bad {key}")
    except ValueError:
        log.failure("node {node}: {what}", node="site-{a}", what="forward failed")
    log.info("Accepted publickey for cms from 127.0.0.1 port 50000 ssh2: ED25519 SHA256:x")
    records = out.getvalue().encode()
    assert records.count(b"\x1e[") == 2 and b"log_format" not in records
    originals: list[LogEvent] = []
    Logger(observer=originals.append, namespace="hub.access.userauth").info(
        "Accepted publickey for cms from 127.0.0.1 port 50000 ssh2: ED25519 SHA256:x")
    clock, spawn = MemoryReactorClock(), Spawner()
    WorkerSupervisor(2, lambda i: [str(i)], spawn, clock).startService()
    spawn.started[0][0].outReceived(records)
    failure, accepted = [e for e in logged if e.get("worker") == 1]
    text = formatEventAsClassicLogText(failure)
    assert text is not None
    assert text.split("\n")[0].endswith(
        "[w1 hub.access.userauth#critical] node site-{a}: forward failed")
    assert "ValueError: bad {key}" in text
    original = dict(originals[0], log_system="w1 hub.access.userauth#info")
    assert formatEventAsClassicLogText(accepted) == formatEventAsClassicLogText(original)
    assert accepted["log_level"] is LogLevel.info


def test_a_worker_never_imports_the_hub_from_the_directory_it_starts_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m` puts the current directory first on sys.path: a `hub` package
    there (a work tree, while a benchmark runs an older hub) would be the worker's."""
    import subprocess

    decoy = tmp_path / "hub" / "app"
    decoy.mkdir(parents=True)
    for package in (tmp_path / "hub", decoy):
        (package / "__init__.py").write_text("")
    (decoy / "worker.py").write_text("print('the decoy worker')\n")
    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--data", "state", "--workers", "2"])
    args = worker_arguments(options, Options.optParameters, Options.optFlags, 1, "tcp:2222")
    # No INDEX: the real worker prints its usage and exits 2 before doing anything.
    ran = subprocess.run(args[:4], capture_output=True, text=True, timeout=60)
    assert "the decoy worker" not in ran.stdout
    assert ran.returncode == 2 and "usage: python -m hub.app.worker" in ran.stderr
