"""Prometheus metrics (`--metrics`): `/metrics` on a listener of its own.

The lower layers keep plain counts where the work happens (the SSH factory's
refused logins and channel opens, the tunnels' `Traffic`, the intake's
`IntakeCounts`, the registry's `Latency`); this module turns them, and the hub's
live objects, into metric families when Prometheus scrapes. Nothing here runs
between scrapes. Each hub has its own `CollectorRegistry` (never the global
one), so tests can run several hubs in one process.

Scrapes are answered on the reactor thread: the collector reads live objects
and the registry's SQLite connection, which belong to it (prometheus_client's
own Twisted `MetricsResource` would collect in a worker thread).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.conch.ssh import connection
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from hub import __version__

if TYPE_CHECKING:
    from hub.access.server import HubSSHFactory
    from hub.intake.monitoring import IntakeCounts
    from hub.store.registry import Registry
    from hub.tunnel.sessions import LiveSessions

PREFIX = "callhomehub"

# Label values always shown (at 0 until counted), so that every series exists
# from the start and a rate() over a restart has both ends.
AUTH_KINDS = ("password", "publickey", "invalid_user", "no_callhome_password",
              "refused_preauth")
OPEN_REASONS = {
    connection.OPEN_ADMINISTRATIVELY_PROHIBITED: "administratively_prohibited",
    connection.OPEN_CONNECT_FAILED: "connect_failed",
    connection.OPEN_UNKNOWN_CHANNEL_TYPE: "unknown_channel_type",
    connection.OPEN_RESOURCE_SHORTAGE: "resource_shortage",
}
NSCA_REJECTS = ("version", "crc", "stale", "future", "garbage", "invalid", "strict_host",
                "node_state")


class HubCollector(Collector):
    """The hub's own metrics, computed at scrape time from its live objects."""

    def __init__(self, registry: Registry, sessions: LiveSessions, factory: HubSSHFactory,
                 intake: IntakeCounts | None) -> None:
        self.registry = registry
        self.sessions = sessions
        self.factory = factory
        self.intake = intake

    def collect(self) -> Iterator[Metric]:
        yield from self._nodes_and_tunnels()
        yield from self._counters()
        yield self._registry_latency()
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "The running callhomehub's version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _nodes_and_tunnels(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily(f"{PREFIX}_nodes", "Registered nodes by state.",
                                  labels=["state"])
        for state, n in self.registry.node_counts().items():
            nodes.add_metric([state], n)
        yield nodes
        tunnels = self.sessions.tunnels()
        # One pass over the live tunnels, no registry read: about 1 µs a tunnel.
        forwards = loopback = public = 0
        for tunnel in tunnels:
            forwards += len(tunnel.table)
            listening = 0
            for listener in tunnel.listeners.values():
                if listener.port is not None:  # else being closed
                    listening += 1
            if tunnel.public:
                public += listening
            else:
                loopback += listening
        ports = {"loopback": loopback, "public": public}
        yield GaugeMetricFamily(f"{PREFIX}_tunnels_online",
                                "Nodes with a live tunnel (a connection that forwards).",
                                value=len(tunnels))
        yield GaugeMetricFamily(f"{PREFIX}_forwards", "Live forwards of all tunnels.",
                                value=forwards)
        open_ports = GaugeMetricFamily(f"{PREFIX}_sdt_ports_open",
                                       "Per-device (SDT) ports listening, by interface.",
                                       labels=["interface"])
        for interface, n in ports.items():
            open_ports.add_metric([interface], n)
        yield open_ports

    def _counters(self) -> Iterator[Metric]:
        traffic = self.sessions.traffic
        bytes_ = CounterMetricFamily(f"{PREFIX}_tunnel_bytes",
                                     "Bytes carried through device tunnels, by direction.",
                                     labels=["direction"], unit="bytes")
        bytes_.add_metric(["to_device"], traffic.to_device)
        bytes_.add_metric(["from_device"], traffic.from_device)
        yield bytes_
        yield _labelled(f"{PREFIX}_channel_opens_refused",
                        "Channel opens the hub refused, by SSH reason.", "reason",
                        {OPEN_REASONS.get(code, f"code_{code}"): n
                         for code, n in self.factory.channel_refusals.items()},
                        OPEN_REASONS.values())
        yield _labelled(f"{PREFIX}_auth_failures",
                        "Refused SSH logins and connections refused before login, by kind.",
                        "kind", self.factory.auth_failures, AUTH_KINDS)
        intake = self.intake
        accepted = CounterMetricFamily(f"{PREFIX}_nsca_results_accepted",
                                       "NSCA check results stored.",
                                       value=intake.accepted if intake is not None else 0)
        yield accepted
        yield _labelled(f"{PREFIX}_nsca_results_rejected",
                        "NSCA check results (or packets) rejected, by reason.", "reason",
                        intake.rejected if intake is not None else {}, NSCA_REJECTS)

    def _registry_latency(self) -> Metric:
        latency = self.registry.latency
        family = HistogramMetricFamily(f"{PREFIX}_registry_transaction_seconds",
                                       "Time taken by registry write transactions.",
                                       unit="seconds")
        family.add_metric([], [(_bound(b), n) for b, n in latency.cumulative()],
                          sum_value=latency.total)
        return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _labelled(name: str, doc: str, label: str, counts: Any, always: Any
              ) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value in sorted({*always, *counts}):
        family.add_metric([value], counts.get(value, 0))
    return family


def metrics_registry(registry: Registry, sessions: LiveSessions, factory: HubSSHFactory,
                     intake: IntakeCounts | None) -> CollectorRegistry:
    """A registry of this hub's own: its metrics and the process's (CPU, memory, files)."""
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(HubCollector(registry, sessions, factory, intake))
    ProcessCollector(registry=metrics)
    return metrics


class MetricsPage(Resource):
    """`/metrics`: the text exposition format (OpenMetrics if the scraper asks)."""

    def __init__(self, metrics: CollectorRegistry) -> None:
        super().__init__()
        self.metrics = metrics

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _not_found()

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encode, content_type = choose_encoder(accept)
        request.setHeader("content-type", content_type)
        return encode(self.metrics)  # type: ignore[no-any-return]

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class MetricsRoot(Resource):
    """`/` links to `/metrics`; anything else is 404."""

    def __init__(self, metrics: CollectorRegistry) -> None:
        super().__init__()
        self.putChild(b"metrics", MetricsPage(metrics))

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self
        return _not_found()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/html; charset=utf-8")
        return (b"<!DOCTYPE html><title>callhomehub metrics</title>"
                b'<p><a href="/metrics">/metrics</a></p>\n')


def _not_found() -> IResource:
    return pages.notFound("Not Found", "Only /metrics is served here.")


def metrics_site(metrics: CollectorRegistry) -> Site:
    site = Site(MetricsRoot(metrics))
    site.noisy = False
    site.displayTracebacks = False
    return site
