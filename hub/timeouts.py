"""The one way the hub gives a connection a deadline: Twisted's `TimeoutMixin` on an injected clock.

A protocol or transport mixes in `ClockTimeout`, sets `clock` (an `IReactorTime`, a
`MemoryReactorClock` in tests), calls `setTimeout(seconds)` to start or move its deadline,
`resetTimeout()` on activity, `setTimeout(None)` to stop it, and says what happens in
`timeoutConnection`. A deadline on a Deferred uses `Deferred.addTimeout` with the same clock.

Users: the SSH login deadline (`access.server`), the NSCA read timeout (`intake.protocol`),
the NETCONF preamble and login deadlines (`netconf.callhome`); the device login
(`access.device_client`) is a Deferred with `addTimeout`. What is not a deadline keeps
its own form: keepalives are a `LoopingCall`, the rekey and retry timers and "on the next
turn" calls are a plain `callLater` on the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.protocols.policies import TimeoutMixin


class ClockTimeout(TimeoutMixin):
    """`TimeoutMixin` whose timer runs on `self.clock`, not the global reactor."""

    clock: IReactorTime | None = None

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        clock = self.clock
        if clock is None:
            raise RuntimeError(f"{type(self).__name__}: set clock before setTimeout")
        return clock.callLater(period, func)
