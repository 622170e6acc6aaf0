"""Who may open an SSH connection, and how much password work a source may cost.

Pure rules, values in and decisions out; the clock's time and a random number
are passed in. `Buckets` are token buckets (bcrypt checks per source and
global, log lines); `Admission` decides for each new TCP connection, the way
sshd's `MaxStartups` (random early drop over start:rate:full) and
`PerSourcePenalties` do, plus a per-source cap with a larger budget for
sources whose devices log in with keys (many share one CGNAT address).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from enum import Enum

from attrs import define, field, frozen


@define
class Buckets:
    """Token buckets by key: `burst` tokens, refilled at `rate` per second.

    `reserve` books a token even when it is not there yet (the bucket goes
    into debt), so that callers queued behind each other wait in turn; it
    refuses when the wait would exceed `max_wait`. The least recently used
    keys are forgotten beyond `max_keys` (they start full again).
    """

    rate: float
    burst: float
    max_keys: int = 10000
    _level: OrderedDict[str, tuple[float, float]] = field(factory=OrderedDict)

    def reserve(self, key: str, now: float, max_wait: float = 0.0) -> float | None:
        """Seconds to wait before the booked token is due, or None (refused)."""
        level = self._current(key, now)
        wait = 0.0 if level >= 1 else (1 - level) / self.rate if self.rate > 0 else None
        if wait is None or wait > max_wait:
            return None
        self._store(key, level - 1, now)
        return wait

    def take(self, key: str, now: float) -> bool:
        """Take a token that is there now."""
        return self.reserve(key, now, 0.0) is not None

    def refund(self, key: str, now: float) -> None:
        """Give back a booked token whose work was never done."""
        self._store(key, min(self.burst, self._current(key, now) + 1), now)

    def _current(self, key: str, now: float) -> float:
        level, then = self._level.get(key, (self.burst, now))
        return min(self.burst, level + max(0.0, now - then) * self.rate)

    def _store(self, key: str, level: float, now: float) -> None:
        self._level.pop(key, None)
        self._level[key] = (level, now)
        while len(self._level) > self.max_keys:
            self._level.popitem(last=False)


class Verdict(Enum):
    ACCEPT = "accept"
    # The source is at its cap: accept only in place of one of its
    # connections that has not sent a byte yet (the caller drops that one).
    REPLACE_SILENT = "source at its cap"
    EARLY_DROP = "random early drop"
    FULL = "too many unauthenticated connections"
    PENALIZED = "source penalized"


@frozen
class AdmissionPolicy:
    """The `[limits]` keys that shape admission."""

    start: int = 128  # unauthenticated connections before random early drop
    rate: int = 30  # percent dropped at `start`, rising linearly to 100 at `full`
    full: int = 256
    per_source: int = 10
    per_device_source: int = 100
    penalty_points: int = 10  # bad endings within `penalty_window` before a penalty
    penalty_window: float = 60.0
    penalty_time: float = 60.0
    # Unauthenticated connections a penalized source may still have open at a time
    # (0: refused outright, as sshd does): many devices share one CGNAT address, and a
    # new device's registration must not wait out a neighbour's penalty; one at a time
    # keeps a flood from that address bounded (its passwords are budgeted anyway).
    penalty_trickle: int = 1
    device_memory: float = 86400.0  # how long a key login marks its source as a device source
    exempt: tuple[str, ...] = ()


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def networks(texts: Iterable[str]) -> Networks:
    """Addresses or CIDR networks (checked first with `parse_networks`)."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def within(source: str, nets: Networks) -> bool:
    """Whether the address `source` is in one of `nets` (a name never is)."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return False
    return any(address in net for net in nets)


def parse_networks(texts: Iterable[str]) -> tuple[str, ...]:
    """Check addresses or CIDR networks; ValueError naming the bad one."""
    for text in texts:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an address or network") from None
    return tuple(texts)


def parse_startups(text: str) -> tuple[int, int, int]:
    """Read sshd's "start:rate:full"; ValueError saying what is wrong."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected START:RATE:FULL, got {text!r}")
    start, rate, full = (int(p) for p in parts)
    if not (1 <= start <= full and rate <= 100):
        raise ValueError(f"need 1 <= START <= FULL and RATE <= 100, got {text!r}")
    return start, rate, full


def early_drop(count: int, start: int, rate: int, full: int, draw: float) -> bool:
    """sshd's MaxStartups: with `count` unauthenticated connections, whether
    to drop a new one; `draw` is a uniform random number in [0, 1)."""
    if count >= full:
        return True
    if count < start:
        return False
    p = (rate + (100 - rate) * (count - start) / max(1, full - start)) / 100
    return draw < p


@define
class Admission:
    """Per-source state: penalties and device sources, and the decisions."""

    policy: AdmissionPolicy
    max_sources: int = 10000
    _exempt: Networks = field(init=False)
    _points: OrderedDict[str, list[float]] = field(factory=OrderedDict)
    _penalized: dict[str, float] = field(factory=dict)
    _devices: OrderedDict[str, float] = field(factory=OrderedDict)

    def __attrs_post_init__(self) -> None:
        self._exempt = networks(self.policy.exempt)

    def exempt(self, source: str) -> bool:
        return within(source, self._exempt)

    def device_source(self, source: str, now: float) -> bool:
        seen = self._devices.get(source)
        return seen is not None and now - seen <= self.policy.device_memory

    def cap(self, source: str, now: float) -> int:
        p = self.policy
        return p.per_device_source if self.device_source(source, now) else p.per_source

    def penalized(self, source: str, now: float) -> bool:
        until = self._penalized.get(source)
        if until is None:
            return False
        if now >= until:
            del self._penalized[source]
            return False
        return True

    def decide(self, source: str, now: float, total: int, from_source: int,
               draw: float) -> Verdict:
        """For a new connection from `source`, with `total` unauthenticated
        connections open of which `from_source` from that source."""
        p = self.policy
        exempt = self.exempt(source)
        # A device source is never refused for its attackers' misdeeds; it is
        # held to its (larger) cap instead. A penalized source keeps a trickle.
        if (not exempt and not self.device_source(source, now) and self.penalized(source, now)
                and from_source >= p.penalty_trickle):
            return Verdict.PENALIZED
        if not exempt and from_source >= self.cap(source, now):
            return Verdict.REPLACE_SILENT
        if total >= p.full:
            return Verdict.FULL
        if early_drop(total, p.start, p.rate, p.full, draw):
            return Verdict.EARLY_DROP
        return Verdict.ACCEPT

    def key_login(self, source: str, now: float) -> None:
        self._devices.pop(source, None)
        self._devices[source] = now
        while len(self._devices) > self.max_sources:
            self._devices.popitem(last=False)

    def bad_ending(self, source: str, now: float) -> bool:
        """A connection from `source` ended without a login (silent, timed out,
        too many failures); True when that earns the source a new penalty."""
        if (self.exempt(source) or self.device_source(source, now)
                or self.penalized(source, now)):
            return False
        times = [t for t in self._points.pop(source, []) if now - t <= self.policy.penalty_window]
        times.append(now)
        if len(times) >= self.policy.penalty_points:
            self._penalized[source] = now + self.policy.penalty_time
            times = []
            while len(self._penalized) > self.max_sources:
                self._penalized.pop(next(iter(self._penalized)))
            return True
        self._points[source] = times
        while len(self._points) > self.max_sources:
            self._points.popitem(last=False)
        return False
