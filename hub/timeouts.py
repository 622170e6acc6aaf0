"""The one way the hub gives a connection a deadline: Twisted's `TimeoutMixin` on an injected clock.

A protocol or transport mixes in `ClockTimeout`, sets `clock` (an `IReactorTime`, a
`MemoryReactorClock` in tests), calls `setTimeout(seconds)` to start or move its deadline,
`resetTimeout()` on activity, `setTimeout(None)` to stop it, and says what happens in
`timeoutConnection`. A deadline on a Deferred uses `Deferred.addTimeout` with the same clock.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.protocols.policies import TimeoutMixin


class ClockTimeout(TimeoutMixin):
    """`TimeoutMixin` whose timer runs on `self.clock`, not the global reactor."""

    clock: IReactorTime

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self.clock.callLater(period, func)
