"""What the SSH transports of one factory share: one input round, one output batch.

The reactor runs one read at a time, so the transports of a hub (and the
hub's SSH clients to its devices, which run inside the hub's channels) can
share the state below; a second hub or an unrelated client in the same
process gets an `IOGroup` of its own.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.logger import Logger

from hub.ssh.tcpwrite import OutputBatch


class InputRound:
    """
    The transports' `dataReceived` calls under way (they nest: the hub's SSH
    client to a device runs inside a device's tunnel) and what is to run once
    the outermost returns.
    """

    _log = Logger()

    def __init__(self) -> None:
        self.depth = 0
        self._actions: list[Callable[[], object]] = []

    def defer(self, action: Callable[[], object]) -> bool:
        if not self.depth:
            return False
        self._actions.append(action)
        return True

    def run(self) -> None:
        while self._actions:
            actions, self._actions = self._actions, []
            for action in actions:
                try:
                    action()
                except Exception:
                    self._log.failure("after-input action failed")


@define(eq=False)
class IOGroup:
    """The input round and output batch of a group of transports (see module)."""

    round: InputRound = field(factory=InputRound)
    batch: OutputBatch = field(factory=OutputBatch)
