"""Which devices may create entries from the NETCONF call-home port, and how often.

Anyone can open a TCP connection to `--netconf`, so a device the registry does
not know (by host key) may create a pending node only when the admin said so:
its name (the preamble's DEVICE-ID, else `netconf-` and a fingerprint prefix)
matches a `[netconf] allow` glob, or its preamble's HMAC verified against
`[netconf.secrets]`. Unknown devices are also rate-limited per source address
and in total, and refusals of them are logged once a minute per address.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from attrs import define, field

from hub.rules.throttle import OncePer, TokenBucket

# Addresses whose budgets are tracked; beyond it the table starts afresh (the
# total budget still holds).
MAX_SOURCES = 4096


@define
class Admission:
    """The allow list and the unknown-device budgets of one call-home listener."""

    allow: tuple[str, ...] = ()
    per_minute: int = 10        # unknown devices from one address
    total_per_minute: int = 60  # unknown devices from all addresses
    _sources: dict[str, TokenBucket] = field(factory=dict)
    _total: TokenBucket | None = None
    _said: OncePer = field(factory=OncePer)

    def may_enroll(self, name: str, vouched: bool) -> bool:
        """Whether an unknown device called `name` may become a pending node."""
        return vouched or any(fnmatchcase(name.lower(), p.lower()) for p in self.allow)

    def spend(self, source: str, now: float) -> bool:
        """Count one unknown device from `source`; False when over a budget."""
        if self._total is None:
            self._total = TokenBucket(self.total_per_minute, self.total_per_minute / 60)
        bucket = self._sources.get(source)
        if bucket is None:
            if len(self._sources) >= MAX_SOURCES:
                self._sources.clear()
            bucket = self._sources[source] = TokenBucket(self.per_minute, self.per_minute / 60)
        return bucket.take(now) and self._total.take(now)

    def say(self, now: float, key: str) -> int | None:
        """Whether to log a refusal for `key` now (see `OncePer.due`)."""
        return self._said.due(now, key)
