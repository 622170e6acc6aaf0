"""Prometheus metrics (hub.web.metrics) of in-memory hubs: change a value, see the metric."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from memory_gateway import OperatorChannel, Site, exec_
from memory_hub import connect_client, make_hub, new_key, start_factory
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_nsca_codec import IV, PASSWORD, T0, build_packet, stream
from test_tunnels_memory import Device, RecordingReactor, allocated, jump, open_tcp
from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

import hub as hub_package
from hub.access.server import HubSSHFactory
from hub.app.context import Hub
from hub.app.service import Options, makeService
from hub.intake.monitoring import STORE_INTERVAL, Monitoring
from hub.intake.nsca import CheckResult
from hub.intake.settings import NSCASettings
from hub.rules.figures import WorkerFigures
from hub.web.metrics import HubCollector, metrics_registry, metrics_site

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: Any) -> Samples:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class Metrics:
    def __init__(self, hub: Hub, factory: HubSSHFactory) -> None:
        self.hub = hub
        self.factory = factory
        counts = hub.monitoring.counts if hub.monitoring is not None else None
        self.registry = metrics_registry(hub.registry, hub.sessions, factory, counts)

    def __call__(self, name: str, **labels: str) -> float:
        return value(scrape(self.registry), name, **labels)


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(T0)
    return clock


@pytest.fixture
def hub(tmp_path: Path, clock: MemoryReactorClock) -> Hub:
    hub = make_hub(tmp_path, clock, keepalive="0")
    hub.monitoring = Monitoring(hub.registry, NSCASettings(encryption=1, password=PASSWORD),
                                clock)
    return hub


@pytest.fixture
def metrics(hub: Hub) -> Metrics:
    return Metrics(hub, start_factory(hub))


def test_nodes_by_state_follow_the_registry_also_the_clis_changes(
        hub: Hub, metrics: Metrics) -> None:
    assert [metrics("callhomehub_nodes", state=s) for s in ("pending", "approved", "revoked")
            ] == [0, 0, 0]
    hub.registry.register("site-a", b"ka", "fp", "test")
    hub.registry.register("site-b", b"kb", "fp", "test")
    assert metrics("callhomehub_nodes", state="pending") == 2
    # A change by another process (the admin CLI) counts too.
    cli = type(hub.registry)(hub.config.db_path, now=lambda: 0.0)
    cli.set_state("site-a", "approved", "cli")
    assert metrics("callhomehub_nodes", state="pending") == 1
    assert metrics("callhomehub_nodes", state="approved") == 1


def test_build_info_and_process_metrics(metrics: Metrics) -> None:
    samples = scrape(metrics.registry)
    assert value(samples, "callhomehub_build_info", version=hub_package.__version__) == 1
    assert value(samples, "process_resident_memory_bytes") > 0


def test_each_hub_has_its_own_metrics(tmp_path: Path, clock: MemoryReactorClock,
                                      metrics: Metrics) -> None:
    (tmp_path / "other").mkdir()
    other_hub = make_hub(tmp_path / "other", clock)
    other = Metrics(other_hub, start_factory(other_hub))
    other_hub.registry.register("site-x", b"kx", "fp", "test")
    assert other("callhomehub_nodes", state="pending") == 1
    assert metrics("callhomehub_nodes", state="pending") == 0


def test_refused_logins_are_counted_by_kind(hub: Hub, metrics: Metrics,
                                            clock: MemoryReactorClock) -> None:
    def failures() -> dict[str, float]:
        samples = scrape(metrics.registry)
        return {kind: value(samples, "callhomehub_auth_failures_total", kind=kind)
                for kind in ("password", "publickey", "invalid_user", "no_callhome_password",
                             "refused_preauth")}

    assert set(failures().values()) == {0}
    connect_client(metrics.factory, clock, b"cms", password=b"wrong", peer="192.0.2.1")
    clock.advance(30)  # past the password back-off
    connect_client(metrics.factory, clock, b"mallory", password=b"x", peer="192.0.2.2")
    clock.advance(30)
    # An operator with a key the hub does not know: refused when offered.
    hub.registry.add_user("alice", None, [(new_key().public().blob(), "fp")], ["*"], "test")
    connect_client(metrics.factory, clock, b"alice", key=new_key(), peer="192.0.2.3")
    hub.registry.query("DELETE FROM settings WHERE key = 'callhome_password'")
    connect_client(metrics.factory, clock, b"cms", password=b"secret", peer="192.0.2.4")
    counted = failures()
    assert counted == {"password": 1, "publickey": 1, "invalid_user": 1,
                       "no_callhome_password": 1, "refused_preauth": 0}


def test_connections_refused_before_login_are_counted(tmp_path: Path,
                                                      clock: MemoryReactorClock) -> None:
    (tmp_path / "callhomehub.toml").write_text("[limits]\nmax_unauthenticated = 1\n")
    hub = make_hub(tmp_path, clock)
    metrics = Metrics(hub, start_factory(hub))
    assert metrics.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)) is not None
    assert metrics.factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1)) is None
    assert metrics("callhomehub_auth_failures_total", kind="refused_preauth") == 1


@pytest.fixture
def reactor() -> RecordingReactor:
    return RecordingReactor()


def test_tunnels_forwards_ports_and_bytes(tmp_path: Path, reactor: RecordingReactor) -> None:
    hub = make_hub(tmp_path, reactor, keepalive="0", **{"port-range": "50000-50099"})
    metrics = Metrics(hub, start_factory(hub))
    key = new_key()
    hub.registry.register("site-a", key.public().blob(), "fp", "test")
    device = Device(metrics.factory, reactor, key=key)
    assert metrics("callhomehub_tunnels_online") == 0
    port = allocated(device.forward(b"", 0))
    device.forward(b"", 8080)
    assert metrics("callhomehub_tunnels_online") == 1
    assert metrics("callhomehub_forwards") == 2
    assert metrics("callhomehub_sdt_ports_open", interface="loopback") == 2
    assert metrics("callhomehub_sdt_ports_open", interface="public") == 0
    end, _tcp, chan = open_tcp(reactor, device, port)
    assert chan is not None
    chan.write(b"from the device")
    end.dataReceived(b"to the device!")
    device.pump.flush()
    assert metrics("callhomehub_tunnel_bytes_total", direction="from_device") == 15
    assert metrics("callhomehub_tunnel_bytes_total", direction="to_device") == 14
    # Public access moves the ports to the public interface.
    hub.registry.set_public("site-a", True, "test")
    hub.sessions.enforce()
    assert metrics("callhomehub_sdt_ports_open", interface="public") == 2
    device.hang_up()
    assert metrics("callhomehub_tunnels_online") == 0
    assert metrics("callhomehub_forwards") == 0
    # Counters keep what was carried.
    assert metrics("callhomehub_tunnel_bytes_total", direction="from_device") == 15


def test_jump_host_bytes_go_through_the_tunnel(tmp_path: Path, reactor: RecordingReactor
                                               ) -> None:
    hub = make_hub(tmp_path, reactor, keepalive="0", **{"port-range": "50000-50099"})
    metrics = Metrics(hub, start_factory(hub))
    key, alice = new_key(), new_key()
    hub.registry.register("site-a", key.public().blob(), "fp", "test")
    hub.registry.set_state("site-a", "approved", "test")
    hub.registry.add_user("alice", None, [(alice.public().blob(), "fp")], ["*"], "test")
    device = Device(metrics.factory, reactor, key=key)
    operator = Device(metrics.factory, reactor, key=alice, user=b"alice", peer="198.51.100.7")
    allocated(device.forward(b"", 0))
    opener = jump(operator, device, common.NS(b"site-a") + struct.pack(">L", 22)
                  + common.NS(b"10.9.8.7") + struct.pack(">L", 5555))
    (chan,) = device.conn.forwarded
    opener.write(b"hello device")
    chan.write(b"hi")
    for _ in range(3):
        operator.pump.flush()
        device.pump.flush()
    assert bytes(chan.received) == b"hello device"
    assert metrics("callhomehub_tunnel_bytes_total", direction="to_device") == 12
    assert metrics("callhomehub_tunnel_bytes_total", direction="from_device") == 2


def test_console_gateway_bytes_go_through_the_tunnel(tmp_path: Path) -> None:
    site = Site(tmp_path)
    metrics = Metrics(site.hub, site.factory)
    assert metrics("callhomehub_tunnel_bytes_total", direction="from_device") == 0
    chan = site.operator(b"alice:site-a", exec_(b"hello"))
    assert chan.out == b"hello from root\n"
    # The hub's own SSH session to the device: its encrypted bytes, both ways.
    assert metrics("callhomehub_tunnel_bytes_total", direction="from_device") > 20
    assert metrics("callhomehub_tunnel_bytes_total", direction="to_device") > 0


class Odd(OperatorChannel):
    name = b"x-no-such-channel@example.com"


def test_refused_channel_opens_are_counted_by_reason(tmp_path: Path) -> None:
    site = Site(tmp_path)
    metrics = Metrics(site.hub, site.factory)
    refused = "callhomehub_channel_opens_refused_total"
    assert metrics(refused, reason="administratively_prohibited") == 0
    chan = site.operator(b"alice", exec_(b"hello"))
    client = site.pumps[-1].client
    odd = Odd([])
    client.service.openChannel(odd)
    site.settle()
    assert odd.refused is not None
    assert metrics("callhomehub_channel_opens_refused_total",
                   reason="administratively_prohibited") == 1
    assert chan is not None


def test_nsca_results_accepted_and_rejected(hub: Hub, metrics: Metrics,
                                            clock: MemoryReactorClock) -> None:
    assert hub.monitoring is not None
    factory = hub.monitoring.tcp_factory()
    factory.iv_source = lambda n: IV[:n]
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
    assert proto is not None
    proto.makeConnection(StringTransport())
    proto.dataReceived(stream(1, [build_packet(b"web1", b"HTTP", 0, b"OK")] * 2))
    clock.advance(STORE_INTERVAL)  # the turn's results are stored
    assert metrics("callhomehub_nsca_results_accepted_total") == 2
    proto.dataReceived(b"\x00\x09" * 400)  # not an NSCA packet
    assert metrics("callhomehub_nsca_results_rejected_total", reason="version") == 1
    # From a node: a host that is not its name (strict_host), and from a pending node.
    hub.registry.register("site-a", b"ka", "fp", "test")
    hub.monitoring.deliver("site-a", CheckResult("web1", "HTTP", 0, "OK", T0))
    hub.monitoring.deliver("site-a", CheckResult("site-a", "HTTP", 0, "OK", T0))
    clock.advance(STORE_INTERVAL)
    assert metrics("callhomehub_nsca_results_rejected_total", reason="strict_host") == 1
    assert metrics("callhomehub_nsca_results_rejected_total", reason="node_state") == 1
    assert metrics("callhomehub_nsca_results_accepted_total") == 2


def test_registry_transactions_are_timed(hub: Hub, metrics: Metrics) -> None:
    before = metrics("callhomehub_registry_transaction_seconds_count")
    hub.registry.register("site-a", b"ka", "fp", "test")
    samples = scrape(metrics.registry)
    assert value(samples, "callhomehub_registry_transaction_seconds_count") == before + 1
    assert value(samples, "callhomehub_registry_transaction_seconds_bucket", le="+Inf") \
        == before + 1
    assert value(samples, "callhomehub_registry_transaction_seconds_sum") > 0


# -- the HTTP side --------------------------------------------------------------

def get(site: Any, path: bytes) -> tuple[bytes, bytes]:
    """The status line and the body of GET `path`, over an in-memory connection."""
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def test_metrics_page_root_link_and_404(hub: Hub, metrics: Metrics) -> None:
    site = metrics_site(metrics.registry)
    status, body = get(site, b"/metrics")
    assert status == b"HTTP/1.1 200 OK"
    assert b'callhomehub_nodes{state="pending"} 0.0' in body
    status, body = get(site, b"/")
    assert status == b"HTTP/1.1 200 OK" and b'href="/metrics"' in body
    for path in (b"/other", b"/metrics/x", b"/x/metrics"):
        assert get(site, path)[0] == b"HTTP/1.1 404 Not Found", path


# -- the option ---------------------------------------------------------------------

def test_metrics_option(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data", str(tmp_path)])
    assert options.hub_config.metrics == "tcp:9721:interface=127.0.0.1"
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--metrics", "none"])
    assert options.hub_config.metrics is None
    with pytest.raises(SystemExit) as failed:
        Options().parseOptions(["--data", str(tmp_path), "--metrics", "tcp:x"])
    assert str(failed.value).startswith("callhomehub: --metrics: 'tcp:x' is not a listening "
                                        "endpoint")


def test_the_service_listens_for_metrics_only_when_asked(tmp_path: Path) -> None:
    for extra, listens in ((["--metrics", "tcp:19721:interface=127.0.0.1"], True),
                           (["--metrics", "none"], False)):
        options = Options()
        options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:0:interface=127.0.0.1",
                              "--workers", "1", *extra])
        reactor = MemoryReactorClock()
        top = makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        ports = [(port, interface) for port, _f, _b, interface in reactor.tcpServers]
        top.stopService()
        assert ((19721, "127.0.0.1") in ports) is listens


def test_worker_0_adds_the_other_workers_live_figures_but_not_their_node_counts(
        hub: Hub) -> None:
    """`--workers N`: worker 0's scrape asks the others (hub.app.workers) and adds what they
    said to its own live figures; the node counts are the registry's, counted once."""
    hub.registry.register("site-a", b"k", "SHA256:a", "test")
    factory = start_factory(hub)
    worker1 = HubCollector(hub.registry, hub.sessions, factory, None)
    hub.sessions.traffic.to_device = 700  # what worker 1 carried
    factory.auth_failures["password"] = 2

    class Workers:
        figures = WorkerFigures()
        asked = 0

        def ask_figures(self) -> defer.Deferred[None]:
            self.asked += 1
            self.figures.heard(1, worker1.figures())
            return defer.succeed(None)

    workers = Workers()
    worker0 = metrics_registry(hub.registry, hub.sessions, factory, None, workers=workers)
    before = worker0.before_scrape
    assert before().called and workers.asked == 1
    samples = scrape(worker0)
    # The same sessions stand for both workers here: every live figure counts twice.
    assert value(samples, "callhomehub_tunnel_bytes_total", direction="to_device") == 1400
    assert value(samples, "callhomehub_auth_failures_total", kind="password") == 4
    assert value(samples, "callhomehub_registry_transaction_seconds_count") == 2 * value(
        scrape(metrics_registry(hub.registry, hub.sessions, factory, None)),
        "callhomehub_registry_transaction_seconds_count")
    assert value(samples, "callhomehub_nodes", state="pending") == 1
    assert value(samples, "callhomehub_build_info", version=hub_package.__version__) == 1
