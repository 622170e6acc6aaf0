"""How long registry transactions take: a plain histogram the metrics read.

Bucket bounds in seconds, counts per bucket (not cumulative) and the sum, the
shape a Prometheus histogram is built from; kept here so that the store needs
no metrics library.
"""

from __future__ import annotations

from bisect import bisect_left

from attrs import define, field

# From a cached read (tens of microseconds) to a write waiting on the CLI's
# lock (the registry's busy timeout is 2 s).
BOUNDS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                             0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@define
class Latency:
    """Observations counted by bucket; the last bucket is +Inf."""

    bounds: tuple[float, ...] = BOUNDS
    counts: list[int] = field()
    total: float = 0.0

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, all)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
