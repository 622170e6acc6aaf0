"""The SSH listener's gate before login: admission of new connections and the
budget of bcrypt checks, applying the rules of `hub.rules.admission` to live
transports with the injected clock and random source.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hub.access.limits import Limits
from hub.rules.admission import Admission, AdmissionPolicy, Buckets, Verdict, parse_startups

log = Logger()

# At most one refusal line per source and reason every LOG_EVERY seconds
# (a flood must not flood the log); the next line says how many were quiet.
LOG_EVERY = 10.0


class Unauthenticated(Protocol):
    """What the gate needs of a transport not yet logged in."""

    peer: str

    def silent(self) -> bool:
        """Whether the peer has sent nothing, not even what waits unread."""

    def drop_silent(self) -> None: ...


class Gatekeeper:
    """Counts unauthenticated connections per source and decides on new ones."""

    def __init__(self, limits: Limits, clock: IReactorTime,
                 draw: Callable[[], float] = random.random) -> None:
        start, rate, full = parse_startups(limits.max_startups)
        self.admission = Admission(AdmissionPolicy(
            start=start, rate=rate, full=min(full, limits.max_unauthenticated),
            per_source=limits.per_source_unauthenticated,
            per_device_source=limits.per_device_source_unauthenticated,
            penalty_points=limits.penalty_points, penalty_time=limits.penalty_time,
            penalty_trickle=limits.penalty_trickle,
            exempt=limits.penalty_exempt))
        self.clock = clock
        self.draw = draw
        self.by_source: dict[str, list[Unauthenticated]] = {}
        self.total = 0
        self._log_tokens = Buckets(rate=1 / LOG_EVERY, burst=1)
        self._quiet: dict[str, int] = {}

    def admit(self, source: str) -> bool:
        """Whether to accept a new connection from `source` (it may cost one
        of that source's silent connections)."""
        now = self.clock.seconds()
        mine = self.by_source.get(source, [])
        verdict = self.admission.decide(source, now, self.total, len(mine), self.draw())
        if verdict is Verdict.REPLACE_SILENT:
            silent = next((t for t in mine if t.silent()), None)
            if silent is not None:
                # The oldest connection that has not sent a byte makes room:
                # a device from a flooded address still gets in.
                self._limited_log(source, "{what} connection from {peer}: {why}",
                                  what="dropping a silent", why="its address is at its cap")
                silent.drop_silent()
                return True
        if verdict is Verdict.ACCEPT:
            return True
        if verdict is Verdict.REPLACE_SILENT:
            # A source that keeps hitting its cap earns points towards a penalty.
            self._bad_ending(source, now)
        self._limited_log(source, "{what} connection from {peer}: {why}",
                          what="refusing", why=verdict.value)
        return False

    def opened(self, t: Unauthenticated) -> None:
        self.by_source.setdefault(t.peer, []).append(t)
        self.total += 1

    def done(self, t: Unauthenticated, *, login: bool, key: bool = False) -> None:
        """`t` logged in (`login`, with a key: `key`) or ended without a login."""
        mine = self.by_source.get(t.peer)
        if mine is None or t not in mine:
            return
        mine.remove(t)
        if not mine:
            del self.by_source[t.peer]
        self.total -= 1
        now = self.clock.seconds()
        if key:
            self.admission.key_login(t.peer, now)
        elif not login:
            self._bad_ending(t.peer, now)

    def _bad_ending(self, source: str, now: float) -> None:
        if self.admission.bad_ending(source, now):
            log.warn("{peer}: penalized for {t} s: its connections keep ending without a login",
                     peer=source, t=self.admission.policy.penalty_time)

    def _limited_log(self, source: str, text: str, what: str, why: str) -> None:
        key = f"{source} {what} {why}"
        if not self._log_tokens.take(key, self.clock.seconds()):
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        n = self._quiet.pop(key, 0)
        log.info(text + "{more}", what=what, peer=source, why=why,
                 more=f" ({n} more not logged)" if n else "")


class PasswordBudget:
    """Token buckets of bcrypt checks, per source and for the whole hub, so
    that password guessing cannot take the CPU from anyone else."""

    def __init__(self, limits: Limits, clock: IReactorTime, max_wait: float,
                 exempt: Callable[[str], bool] = lambda source: False) -> None:
        # Exempt addresses (the hub's host, a proxy) take from the hub's
        # bucket only: every login through a proxy comes from its address.
        self.exempt = exempt
        self.per_source = Buckets(rate=limits.password_checks_per_minute / 60,
                                  burst=limits.password_checks_burst)
        self.overall = Buckets(rate=limits.password_checks_global_per_minute / 60,
                               burst=limits.password_checks_global_burst)
        self.clock = clock
        self.max_wait = max_wait

    def reserve(self, source: str) -> float | None:
        """Seconds until a check for `source` may run, or None: refuse it."""
        now = self.clock.seconds()
        exempt = self.exempt(source)
        mine = 0.0 if exempt else self.per_source.reserve(source, now, self.max_wait)
        if mine is None:
            return None
        everyone = self.overall.reserve("", now, self.max_wait)
        if everyone is None:
            if not exempt:
                self.per_source.refund(source, now)
            return None
        return max(mine, everyone)

    def refund(self, source: str) -> None:
        """A booked check that will not run (its connection is gone)."""
        now = self.clock.seconds()
        if not self.exempt(source):
            self.per_source.refund(source, now)
        self.overall.refund("", now)
