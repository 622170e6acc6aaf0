"""Which session recordings to delete: older than the age limit, then the oldest
until the rest fit in the size limit. Pure: the caller lists, deletes and logs."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from attrs import frozen


@frozen
class Kept:
    """One recording on file: its session id, when it started, its size in bytes."""

    id: int
    start: float
    size: int


MAX_AGE_DAYS = 90.0
MAX_TOTAL_MB = 1024.0


@frozen
class RetentionRules:
    max_age_days: float = MAX_AGE_DAYS
    max_total_mb: float = MAX_TOTAL_MB

    def prune(self, kept: Sequence[Kept], now: float, live: Collection[int] = ()
              ) -> list[tuple[Kept, str]]:
        """The recordings to delete, oldest first, each with why. A recording still
        being written (`live`) is never deleted."""
        oldest = sorted((k for k in kept if k.id not in live), key=lambda k: (k.start, k.id))
        limit = now - self.max_age_days * 86400
        out = [(k, f"older than {self.max_age_days:g} days") for k in oldest if k.start < limit]
        gone = {k.id for k, _ in out}
        total = sum(k.size for k in kept if k.id not in gone)
        budget = self.max_total_mb * 1024 * 1024
        for k in oldest:
            if total <= budget:
                break
            if k.id in gone:
                continue
            out.append((k, f"total over {self.max_total_mb:g} MB"))
            total -= k.size
        return out
