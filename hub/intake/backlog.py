"""The intake's backlog: results taken from senders and not yet stored, bounded.

A registry slower than the senders would otherwise let results pile up in
memory without limit. Past `limit` results the intake stops reading from the
senders that delivered them (a TCP connection stops being read, an in-tunnel
channel stops granting SSH window), and reads again once a store brings the
backlog back under the limit: results wait in the senders, nothing is dropped.
"""

from __future__ import annotations

from typing import Protocol

from attrs import define, field

# About 10 MB of results held in the hub at most, a few seconds of a busy intake.
BACKLOG_LIMIT = 10_000


class Pausable(Protocol):
    """What a sender's connection offers: a TCP transport, the intake's channel."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


@define(eq=False)
class Backlog:
    """How many results wait, and the senders paused until fewer do."""

    limit: int = BACKLOG_LIMIT
    size: int = 0
    _paused: list[Pausable] = field(factory=list)

    @property
    def paused(self) -> int:
        """Senders not read from now."""
        return len(self._paused)

    def add(self, n: int) -> None:
        self.size += n

    def check(self, sender: Pausable) -> None:
        """Called after `sender`'s results were added: pause it if the backlog is full."""
        if self.size >= self.limit and sender not in self._paused:
            self._paused.append(sender)
            sender.pauseProducing()

    def stored(self, n: int) -> None:
        """`n` results left the backlog (stored, or refused by the registry and
        logged): under the limit, every paused sender is read again."""
        self.size -= n
        if self.size < self.limit and self._paused:
            paused, self._paused = self._paused, []
            for sender in paused:
                sender.resumeProducing()

    def forget(self, sender: Pausable) -> None:
        """`sender` closed: nothing to resume."""
        if sender in self._paused:
            self._paused.remove(sender)
