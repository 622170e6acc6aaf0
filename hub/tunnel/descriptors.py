"""Descriptors kept free for the SSH listener.

Forward ports (and any other listener that asks) stop accepting while fewer
than `reserve` descriptors are free, so that connections to them cannot use
the descriptors devices need to log in. Counting the open descriptors
(/proc/self/fd) costs a directory read, so a count is reused for `interval`
seconds, plus one for each connection let in since: an estimate that errs
towards refusing. The descriptor limit is read again with each count, not for
every connection (a system call each, on every short connection's path).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

from attrs import define
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


def soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0  # no /proc: no reserve


@define
class DescriptorReserve:
    clock: IReactorTime
    reserve: int
    interval: float = 0.5
    limit: Callable[[], int] = soft_limit
    count: Callable[[], int] = open_descriptors
    _counted: float | None = None
    _estimate: int = 0
    _counted_limit: int = 0
    _refused: int = 0

    def allows(self, what: str) -> bool:
        """Whether a new connection to `what` may take a descriptor."""
        now = self.clock.seconds()
        if self._counted is None or now - self._counted >= self.interval:
            self._counted, self._estimate, self._counted_limit = now, self.count(), self.limit()
        free = self._counted_limit - self._estimate
        if free > self.reserve:
            self._estimate += 1
            if self._refused:
                log.info("descriptors free again: accepting on {what} ({n} refused)",
                         what=what, n=self._refused)
                self._refused = 0
            return True
        if not self._refused:
            log.warn("only {free} descriptors free (reserve {reserve} for SSH logins): "
                     "refusing connections to {what}", free=free, reserve=self.reserve,
                     what=what)
        self._refused += 1
        return False
