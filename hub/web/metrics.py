"""Prometheus metrics (`--metrics`): `/metrics` on a listener of its own.

The lower layers keep plain counts where the work happens (the SSH factory's
refused logins and channel opens, the tunnels' `Traffic`, the intake's
`IntakeCounts`, the registry's `Latency`); this module turns them, and the hub's
live objects, into metric families when Prometheus scrapes. Nothing here runs
between scrapes. Each hub has its own `CollectorRegistry` (never the global
one), so tests can run several hubs in one process.

Scrapes are answered on the reactor thread: the collector reads live objects,
which belong to it (prometheus_client's own Twisted `MetricsResource` would
collect in a worker thread). The node counts are read in the hub's registry
thread first, and the scrape answered once they are back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

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
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from hub import __version__
from hub.rules.figures import Figure, SampleKey, WorkerFigures, sample_key
from hub.store.registry import Registry

if TYPE_CHECKING:
    from hub.access.server import HubSSHFactory
    from hub.intake.monitoring import IntakeCounts
    from hub.store.offthread import RegistryCalls
    from hub.tunnel.sessions import LiveSessions

log = Logger()

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
    """The hub's own metrics, computed at scrape time from its live objects.

    With workers (`--workers N`), worker 0's collector adds the other workers'
    live figures (`others`: what `WorkerFigures.totals` gives) to its own; the
    node counts are the registry's, for the whole fleet, and counted once."""

    def __init__(self, registry: Registry, sessions: LiveSessions, factory: HubSSHFactory,
                 intake: IntakeCounts | None, calls: RegistryCalls | None = None,
                 others: Callable[[], dict[SampleKey, float]] | None = None) -> None:
        self.registry = registry
        self.sessions = sessions
        self.factory = factory
        self.intake = intake
        # With the hub's registry thread, the node counts are read there before
        # each scrape (`refresh`), never on the reactor.
        self.calls = calls
        self.counts: dict[str, int] = {}
        self.others = others

    def refresh(self) -> defer.Deferred[None]:
        """Read the node counts in the registry thread (before a scrape)."""
        assert self.calls is not None

        def keep(counts: dict[str, int]) -> None:
            self.counts = counts

        return self.calls.call(Registry.node_counts).addCallback(keep)

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily(f"{PREFIX}_nodes", "Registered nodes by state.",
                                  labels=["state"])
        counts = self.registry.node_counts() if self.calls is None else self.counts
        for state, n in counts.items():
            nodes.add_metric([state], n)
        yield nodes
        others = self.others() if self.others is not None else {}
        for family in self.live():
            if others:
                family.samples = [s._replace(value=s.value + others.get(
                    sample_key(s.name, s.labels), 0)) for s in family.samples]
            yield family
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "The running callhomehub's version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def live(self) -> Iterator[Metric]:
        """This process's own figures: its tunnels, counters and registry latency."""
        yield from self._tunnels()
        yield from self._counters()
        yield self._registry_latency()

    def figures(self) -> list[Figure]:
        """`live` as a worker sends it to worker 0."""
        return [(family.type, s.name, s.labels, s.value)
                for family in self.live() for s in family.samples]

    def _tunnels(self) -> Iterator[Metric]:
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


class Workers(Protocol):
    """Worker 0's view of the other workers (`hub.app.workers.WorkerSupervisor`)."""

    figures: WorkerFigures

    def ask_figures(self) -> defer.Deferred[None]:
        """Ask every running worker for its live figures; fires when all have answered
        or a few seconds have passed (then `figures` holds what they said last)."""


class HubMetrics(CollectorRegistry):
    """The hub's collectors, and what to read off the reactor before a scrape."""

    before_scrape: Callable[[], defer.Deferred[None]] | None = None


def metrics_registry(registry: Registry, sessions: LiveSessions, factory: HubSSHFactory,
                     intake: IntakeCounts | None, calls: RegistryCalls | None = None,
                     workers: Workers | None = None) -> CollectorRegistry:
    """A registry of this hub's own: its metrics and the process's (CPU, memory, files).
    With `calls` (the hub's registry thread) the node counts are read there; with
    `workers` (worker 0 of several) their live figures are asked for and added."""
    metrics = HubMetrics(auto_describe=False)
    others = workers.figures.totals if workers is not None else None
    collector = HubCollector(registry, sessions, factory, intake, calls, others)
    metrics.register(collector)
    if calls is not None or workers is not None:
        def before() -> defer.Deferred[None]:
            counted = collector.refresh() if calls is not None else defer.succeed(None)
            if workers is None:
                return counted
            # Both at once; asking the workers never fails (it falls back on what
            # they said last), so a failure is the node counts', reported as such.
            return workers.ask_figures().addCallback(lambda _: counted)

        metrics.before_scrape = before
    ProcessCollector(registry=metrics)
    return metrics


class MetricsPage(Resource):
    """`/metrics`: the text exposition format (OpenMetrics if the scraper asks)."""

    def __init__(self, metrics: CollectorRegistry) -> None:
        super().__init__()
        self.metrics = metrics

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _not_found()

    def render_GET(self, request: Request) -> bytes | int:
        before = getattr(self.metrics, "before_scrape", None)
        if before is None:
            return self._encode(request)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(_: object) -> None:
            body = self._encode(request)
            if not gone and not request.finished:
                request.setHeader("content-length", str(len(body)))
                request.write(b"" if request.method == b"HEAD" else body)
                request.finish()

        def failed(f: Failure) -> None:
            log.error("metrics: reading the node counts failed: {why}",
                      why=f.getErrorMessage())
            if not gone and not request.finished:
                request.setResponseCode(500)
                request.setHeader("content-type", "text/plain; charset=utf-8")
                request.write(f"the hub's registry failed: {f.getErrorMessage()}\n".encode())
                request.finish()

        before().addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _encode(self, request: Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encode, content_type = choose_encoder(accept)
        request.setHeader("content-type", content_type)
        return encode(self.metrics)  # type: ignore[no-any-return]

    def render_HEAD(self, request: Request) -> bytes | int:
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
