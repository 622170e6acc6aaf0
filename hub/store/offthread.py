"""The hub's registry calls, off the reactor: one thread of their own, in order.

A registry call may take a disk flush (SQLite) or a network round trip
(PostgreSQL); on the reactor thread it would stall every tunnel and keepalive
for that long. `RegistryThread` owns the hub's `Registry` object, runs the
calls one at a time in the order they were made (so `mark_online` lands before
`mark_offline`, audit rows in order) and fires each call's Deferred back on the
reactor. It is not the reactor's thread pool: bcrypt runs there, and a login
check must not queue behind the database, nor the database behind bcrypt.

Writes nobody waits for (`write`, `refresh`) that are queued back to back run
as one batch: one transaction with a savepoint per write (`Registry.batch`), so
a write that fails is undone alone, and the others land with one commit and one
take of SQLite's write lock instead of one each. Their Deferreds fire once the
batch has committed.

Nothing that changes state is ever dropped: `call` and `write` are queued
whatever the length of the queue. Past `limit` waiting calls the hub says so
in the log (once a minute); only `refresh` calls (a connected node's "last
seen", rewritten a minute later anyway) are skipped then.

`InlineCalls` is the same interface run at once on the caller's thread: for
tools and tests that own a `Registry` outright.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from attrs import define, field
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.errors import BatchBroken, RegistryError, RegistryStopped
from hub.store.registry import Registry

log = Logger()

P = ParamSpec("P")
T = TypeVar("T")

# Calls waiting beyond this many are reported (a database slower than the hub's
# writes); 10,000 is a reconnect storm's worth of mark_online and lease calls.
QUEUE_LIMIT = 10_000
WARN_EVERY = 60.0
# Writes of the form fn(registry, *names) that the thread runs as one call when
# they are queued back to back (the order of other calls around them is kept).
COALESCED = frozenset({Registry.mark_offline})
# Writes queued back to back that run as one batch at most (`Registry.batch`):
# enough to take a storm's writes a few dozen at a time, few enough that the
# other processes sharing the registry wait a few milliseconds for its lock.
BATCH_LIMIT = 64


class RegistryCalls(Protocol):
    """How hub code reaches the registry: every call is a method of `Registry`,
    named unbound (`calls.write(Registry.mark_online, node, peer)`)."""

    def call(self, fn: Callable[Concatenate[Registry, P], T], *args: P.args,
             **kwargs: P.kwargs) -> defer.Deferred[T]:
        """Run `fn(registry, ...)`; its result (or failure) comes back on the reactor."""

    def write(self, fn: Callable[Concatenate[Registry, P], object], *args: P.args,
              **kwargs: P.kwargs) -> None:
        """A change nobody waits for: queued, never dropped, its failure logged."""

    def refresh(self, fn: Callable[Concatenate[Registry, P], object], *args: P.args,
                **kwargs: P.kwargs) -> None:
        """A write that may be skipped when the queue is over its limit."""


def describe(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """`mark_online('n1', '192.0.2.1')`: a call as the log names it."""
    shown = ", ".join(repr(a) if not isinstance(a, bytes) else f"<{len(a)} bytes>"
                      for a in args)
    return f"{getattr(fn, '__name__', 'call')}({shown})"


def invoke(registry: Registry, fn: Callable[..., T], args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> T:
    """`fn(registry, ...)`; a `Registry` method named unbound runs as the registry
    object's own (an engine's subclass may override it)."""
    name = getattr(fn, "__name__", "")
    if getattr(Registry, name, None) is fn:
        return getattr(registry, name)(*args, **kwargs)  # type: ignore[no-any-return]
    return fn(registry, *args, **kwargs)


# A coalesced batch's one failure, shared by all its callers, and the batch as the log
# names it; None once a caller has logged it (one line for the batch, not one per caller).
_BATCHES: weakref.WeakKeyDictionary[Failure, str | None] = weakref.WeakKeyDictionary()
SHOWN_IN_BATCH = 3


def describe_batch(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """`mark_offline('n1', 'n2', 'n3', and 997 more)`: a coalesced write as the log names it."""
    if len(args) <= SHOWN_IN_BATCH:
        return describe(fn, args)
    shown = describe(fn, args[:SHOWN_IN_BATCH])[:-1]
    return f"{shown}, and {len(args) - SHOWN_IN_BATCH:,} more)"


def _logged(what: str) -> Callable[[Failure], None]:
    def failed(f: Failure) -> None:
        batch = _BATCHES.get(f, "")
        if batch is None:
            return  # an earlier caller of the same batch logged it
        if batch:
            _BATCHES[f] = None
        log.error("registry write {call} failed: {why}; the hub goes on without it",
                  call=batch or what, why=f.getErrorMessage() or repr(f.value))
    return failed


@define(eq=False)
class InlineCalls:
    """`RegistryCalls` run at once on the caller's thread (their Deferreds have
    fired on return)."""

    registry: Registry

    def call(self, fn: Callable[Concatenate[Registry, P], T], *args: P.args,
             **kwargs: P.kwargs) -> defer.Deferred[T]:
        return defer.maybeDeferred(invoke, self.registry, fn, args, kwargs)

    def write(self, fn: Callable[Concatenate[Registry, P], object], *args: P.args,
              **kwargs: P.kwargs) -> None:
        self.call(fn, *args, **kwargs).addErrback(_logged(describe(fn, args)))

    def refresh(self, fn: Callable[Concatenate[Registry, P], object], *args: P.args,
                **kwargs: P.kwargs) -> None:
        self.write(fn, *args, **kwargs)


# fn, args, kwargs, the caller's Deferred, and whether it may share a batch (a write).
_Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "defer.Deferred[Any]", bool]


@define(eq=False)
class RegistryThread(Service):
    """The hub's registry, owned by one thread that runs calls in FIFO order.

    `open_registry` runs in that thread (an SQLite connection belongs to the
    thread that opened it). Results come back through `reactor.callFromThread`;
    with no reactor (unit tests on a MemoryReactorClock) they wait for `drain`.
    """

    open_registry: Callable[[], Registry]
    reactor: IReactorFromThreads | None
    clock: IReactorTime
    limit: int = QUEUE_LIMIT
    warn_every: float = WARN_EVERY
    # How many refresh calls were skipped over the limit, since start.
    skipped: int = 0
    _jobs: deque[_Job | None] = field(factory=deque)
    _done: deque[tuple[defer.Deferred[Any], Any]] = field(factory=deque)
    _lock: threading.Condition = field(factory=threading.Condition)
    _waiting: int = 0            # queued or running, not finished (under _lock)
    _wake_scheduled: bool = False
    _thread: threading.Thread | None = None
    _closed: bool = False
    _warned_at: float | None = None
    _late_writes: int = 0

    # -- the reactor side ----------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._start()

    def stopService(self) -> defer.Deferred[None]:
        """Stop once every call queued before now has run (queued writes land)."""
        Service.stopService(self)
        if self._closed:
            return defer.succeed(None)
        done = self.call(Registry.close)
        self._closed = True
        with self._lock:
            self._jobs.append(None)
            self._lock.notify_all()

        def stopped(result: object) -> None:
            if isinstance(result, Failure):
                log.error("registry closed with an error: {why}", why=result.getErrorMessage())
            log.info("registry thread stopped")

        return done.addBoth(stopped)

    def call(self, fn: Callable[Concatenate[Registry, P], T], *args: P.args,
             **kwargs: P.kwargs) -> defer.Deferred[T]:
        return self._queue(fn, args, kwargs, False)

    def _queue(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any],
               batched: bool) -> defer.Deferred[T]:
        if self._closed:
            return defer.fail(RegistryStopped(
                f"registry call {describe(fn, args)} after the hub stopped"))
        self._start()
        done: defer.Deferred[T] = defer.Deferred()
        with self._lock:
            self._jobs.append((fn, args, kwargs, done, batched))
            self._waiting += 1
            waiting = self._waiting
            self._lock.notify_all()
        if waiting > self.limit:
            self._warn(waiting)
        return done

    def write(self, fn: Callable[Concatenate[Registry, P], object], *args: P.args,
              **kwargs: P.kwargs) -> None:
        if self._closed:
            # Connections closing as the process exits: their nodes go offline in
            # the registry at the next start (reset_online), so one line says so.
            if not self._late_writes:
                log.info("registry closed: changes made as the hub stops (nodes going "
                         "offline) are not written; the next start marks every node offline")
            self._late_writes += 1
            return
        self._queue(fn, args, kwargs, True).addErrback(_logged(describe(fn, args)))

    def refresh(self, fn: Callable[Concatenate[Registry, P], object], *args: P.args,
                **kwargs: P.kwargs) -> None:
        if self.queued() >= self.limit:
            self.skipped += 1
            self._warn(self.queued())
            return
        self.write(fn, *args, **kwargs)

    def queued(self) -> int:
        """Calls queued or running now."""
        with self._lock:
            return self._waiting

    def _warn(self, waiting: int) -> None:
        now = self.clock.seconds()
        if self._warned_at is None or now - self._warned_at >= self.warn_every:
            self._warned_at = now
            log.warn("registry is behind: {waiting} calls waiting (limit {limit}); the database "
                     "answers slower than the hub asks. Changes stay queued in order; "
                     "{skipped} last-seen refreshes skipped so far",
                     waiting=waiting, limit=self.limit, skipped=self.skipped)

    def deliver(self) -> None:
        """Fire the Deferreds of finished calls (on the reactor thread)."""
        with self._lock:
            self._wake_scheduled = False
        while True:
            try:
                done, outcome = self._done.popleft()
            except IndexError:
                return
            done.callback(outcome) if not isinstance(outcome, Failure) else done.errback(outcome)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued call has run and its Deferred fired, including
        calls their callbacks made (tests that read the registry after acting)."""
        deadline = monotonic() + timeout
        while True:
            with self._lock:
                while self._waiting:
                    left = deadline - monotonic()
                    if left <= 0:
                        raise TimeoutError(f"registry calls still waiting after {timeout} s")
                    self._lock.wait(left)
            if not self._done:
                return
            self.deliver()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="registry", daemon=True)
            self._thread.start()

    # -- the registry thread -----------------------------------------------------------

    def _work(self) -> None:
        registry: Registry | None = None
        failure: BaseException | None = None
        try:
            registry = self.open_registry()
        except Exception as e:  # every call says why, in words
            failure = e
            log.error("registry thread cannot open the registry: {why}", why=str(e))
        while True:
            with self._lock:
                while not self._jobs:
                    self._lock.wait()
                if self._jobs[0] is None:
                    return
                runs = self._take()
            if registry is None:
                error = RegistryError(f"the registry could not be opened: {failure}")
                outcomes = [Failure(error) for _ in runs]
            else:
                outcomes = run_batch(registry, runs) if len(runs) > 1 else [run(registry, runs[0])]
            finished = 0
            for (_, _, _, dones), outcome in zip(runs, outcomes, strict=True):
                self._done.extend((d, outcome) for d in dones)
                finished += len(dones)
            with self._lock:
                self._waiting -= finished
                self._lock.notify_all()
                wake = self.reactor is not None and not self._wake_scheduled
                if wake:
                    self._wake_scheduled = True
            if wake:
                assert self.reactor is not None
                self.reactor.callFromThread(self.deliver)

    def _take(self) -> list[_Run]:
        """The next call, or the writes queued back to back from the head (one batch);
        the same coalesced write queued back to back is one run (under _lock)."""
        runs: list[_Run] = []
        while self._jobs and (job := self._jobs[0]) is not None and len(runs) < BATCH_LIMIT:
            fn, args, kwargs, done, batched = job
            if runs and not batched:
                break
            self._jobs.popleft()
            dones = [done]
            if fn in COALESCED and not kwargs:
                # The same write queued back to back (thousands of tunnels lost at
                # once, as the hub stops): one call for all.
                while self._jobs and (ahead := self._jobs[0]) is not None \
                        and ahead[0] is fn and not ahead[2] and ahead[4] == batched:
                    self._jobs.popleft()
                    args += ahead[1]
                    dones.append(ahead[3])
            runs.append((fn, args, kwargs, dones))
            if not batched:
                break
        return runs


# One call to run: fn, args, kwargs and the Deferreds of its callers (several for a
# coalesced write).
_Run = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], list["defer.Deferred[Any]"]]


def run(registry: Registry, job: _Run) -> Any:
    """The call's result, or its Failure (shared by the callers of a coalesced write,
    logged once naming the batch)."""
    fn, args, kwargs, dones = job
    try:
        return invoke(registry, fn, args, kwargs)
    except BaseException:
        outcome = Failure()
        outcome.cleanFailure()
        if len(dones) > 1:
            _BATCHES[outcome] = describe_batch(fn, args)
        return outcome


def run_batch(registry: Registry, jobs: list[_Run]) -> list[Any]:
    """The writes `jobs` in one transaction (`Registry.batch`), each with its own
    outcome. If the batch broke before its commit (nothing of it committed), each
    runs again alone; if the commit failed, every write failed with it."""
    try:
        with registry.batch():
            outcomes = []
            for job in jobs:
                outcome = run(registry, job)
                if isinstance(outcome, Failure) and outcome.check(BatchBroken):
                    outcome.raiseException()
                outcomes.append(outcome)
    except BatchBroken as e:
        log.warn("registry batch of {n} writes broken ({why}); each is written alone",
                 n=len(jobs), why=str(e))
        return [run(registry, job) for job in jobs]
    except BaseException:
        failed = Failure()
        failed.cleanFailure()
        _BATCHES[failed] = describe_writes(jobs)
        return [failed] * len(jobs)
    return outcomes


def describe_writes(jobs: list[_Run]) -> str:
    """`a batch of 12 writes: mark_online('n1', ...), ...`: a failed batch as the log names it."""
    shown = ", ".join(describe_batch(fn, args) for fn, args, _, _ in jobs[:2])
    more = ", ..." if len(jobs) > 2 else ""
    return f"a batch of {len(jobs)} writes: {shown}{more}"
