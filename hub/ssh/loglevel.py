"""Conch's debug events dropped where they are made, when the hub logs above debug.

Conch logs at debug level on every connection ("kex alg=…", "trying auth
method …", "starting service …", each global request). The hub's observers
drop them by level, but only after `Logger.emit` built the event and the
global publisher handed it on: 3-4 % of a worker's time in a reconnect storm
of devices. The hub's Conch subclasses take `GatedLogger` as their `_log`, and
the service sets the lowest level it logs (`--log-level`) once at start.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.logger import Logger, LogLevel


class GatedLogger(Logger):
    """A `Logger` that drops an event below the hub's lowest logged level before
    building it (nothing is dropped until `drop_below` is called)."""

    dropped: ClassVar[frozenset[LogLevel]] = frozenset()

    @classmethod
    def drop_below(cls, level: LogLevel) -> None:
        """From now on drop the events of every level below `level`."""
        cls.dropped = frozenset(lv for lv in LogLevel.iterconstants() if lv < level)

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        if level in self.dropped:
            return
        super().emit(level, format, **kwargs)
