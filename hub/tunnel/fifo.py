"""One request at a time, in arrival order: how a session carries out forward requests.

A node's forward and cancel requests touch the same ports, so each waits for
the one before it (a cancel for its listener to stop, a forward for its
bind), and all of them for the previous session of the node to release its
listeners. A request that fails fails alone: the next one still runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


@define(eq=False)
class RequestQueue:
    """Runs queued callables one by one; each may return a Deferred to finish later."""

    # A list, not a deque: it holds a few requests at most, and an idle tunnel
    # keeps one (an empty deque costs 600 bytes more per tunnel).
    _pending: list[tuple[Callable[[], Any], defer.Deferred[Any]]] = field(factory=list)
    _holds: int = 0        # things to wait for before running anything
    _running: bool = False  # a request has started and not finished
    _draining: bool = False

    def run(self, request: Callable[[], Any]) -> defer.Deferred[Any]:
        """Queue `request`; the Deferred fires with its result (or failure) once it ran."""
        done: defer.Deferred[Any] = defer.Deferred()
        self._pending.append((request, done))
        self._drain()
        return done

    def wait_for(self, event: defer.Deferred[Any]) -> None:
        """Run nothing more until `event` fires (whatever its result)."""
        self._holds += 1

        def released(result: Any) -> None:
            if isinstance(result, Failure):
                log.failure("a forward request waited for something that failed", result)
            self._holds -= 1
            self._drain()

        event.addBoth(released)

    def _drain(self) -> None:
        # A loop, not recursion, for requests that finish at once; re-entered
        # from a request finishing inside the loop, it leaves the work to it.
        if self._draining:
            return
        self._draining = True
        try:
            while self._pending and not self._running and not self._holds:
                request, done = self._pending.pop(0)
                self._running = True
                defer.maybeDeferred(request).addBoth(self._finished, done)
        finally:
            self._draining = False

    def _finished(self, result: Any, done: defer.Deferred[Any]) -> None:
        self._running = False
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)
        self._drain()
