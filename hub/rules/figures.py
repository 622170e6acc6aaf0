"""The live figures of a hub's worker processes as worker 0 adds them up for /metrics.

Pure: worker 0 (hub.app.workers) hears each worker's figures, hub.web.metrics adds the
totals to its own. Kept apart from the metrics module so that the CLI and the workers'
supervision need not import the web stack.
"""

from __future__ import annotations

from attrs import define, field

# One sample of a worker's live figures as it travels to worker 0:
# [family type, sample name, labels, value].
Figure = tuple[str, str, dict[str, str], float]
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def sample_key(name: str, labels: dict[str, str]) -> SampleKey:
    return name, tuple(sorted(labels.items()))


# Families whose samples only grow: a worker that starts again starts them at 0.
_MONOTONIC = ("counter", "histogram")


@define(eq=False)
class WorkerFigures:
    """The live figures of workers 1..N-1 as worker 0 last heard them, summed.

    Counters stay monotonic over a worker's restart (its counts start again at 0):
    what it had counted before is kept as an offset. A worker that is not running
    adds its counters but none of its gauges (its tunnels are gone)."""

    _last: dict[int, dict[SampleKey, tuple[str, float]]] = field(factory=dict)
    _offsets: dict[SampleKey, float] = field(factory=dict)
    _running: set[int] = field(factory=set)

    def heard(self, worker: int, figures: list[Figure]) -> None:
        previous = self._last.get(worker, {})
        now = {sample_key(name, labels): (kind, float(value))
               for kind, name, labels, value in figures}
        for key, (kind, value) in now.items():
            before = previous.get(key)
            if kind in _MONOTONIC and before is not None and value < before[1]:
                self._offsets[key] = self._offsets.get(key, 0.0) + before[1]
        for key, (kind, value) in previous.items():
            if kind in _MONOTONIC and key not in now:
                self._offsets[key] = self._offsets.get(key, 0.0) + value
        self._last[worker] = now
        self._running.add(worker)

    def stopped(self, worker: int) -> None:
        """The worker's process ended: its gauges no longer count."""
        self._running.discard(worker)

    def totals(self) -> dict[SampleKey, float]:
        total = dict(self._offsets)
        for worker, samples in self._last.items():
            running = worker in self._running
            for key, (kind, value) in samples.items():
                if running or kind in _MONOTONIC:
                    total[key] = total.get(key, 0.0) + value
        return total
