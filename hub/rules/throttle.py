"""Throttles as values: a token bucket, and "say it once per interval" for log lines.

Both take the time as a number from their caller (the reactor's `seconds()`),
so a flood costs one log line a minute and the rules are tested without a reactor.
"""

from __future__ import annotations

from attrs import define, field


@define
class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; `take` spends one if there is one."""

    burst: float
    rate: float
    _tokens: float | None = None
    _at: float = 0.0

    def take(self, now: float) -> bool:
        tokens = self.burst if self._tokens is None else min(
            self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True


@define
class OncePer:
    """Whether to log an event now: the first of each key, then at most one per
    `interval` seconds; `due` returns how many were held back since the last line
    (None: hold this one back too). Keeps at most `max_keys` keys."""

    interval: float = 60.0
    max_keys: int = 1024
    _last: dict[str, tuple[float, int]] = field(factory=dict)

    _overflow: tuple[float, int] | None = None

    def due(self, now: float, key: str = "") -> int | None:
        last = self._last.get(key)
        if last is None and len(self._last) >= self.max_keys:
            # Forget the keys whose interval is over; a flood of fresh keys beyond
            # that shares one line per interval.
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
            if len(self._last) >= self.max_keys:
                held, self._overflow = self._check(now, self._overflow)
                return held
        held, self._last[key] = self._check(now, last)
        return held

    def _check(self, now: float, last: tuple[float, int] | None
               ) -> tuple[int | None, tuple[float, int]]:
        if last is not None and now - last[0] < self.interval:
            return None, (last[0], last[1] + 1)
        return (0 if last is None else last[1]), (now, 0)
