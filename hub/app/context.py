"""The running hub's shared parts, handed to every avatar and service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from hub.app.config import HubConfig
from hub.ssh.keys import HubKeys
from hub.store.registry import Registry
from hub.tunnel.live import LiveSessions


@define(eq=False)
class Hub:
    config: HubConfig
    registry: Registry
    keys: HubKeys
    clock: IReactorTime
    run_in_thread: Callable[..., defer.Deferred[Any]]
    sessions: LiveSessions
    reactor: Any = None
    # Set by the NSCA wiring: builds the in-tunnel intake channel, or None.
    nsca_channel_factory: Callable[..., Any] | None = field(default=None)
    monitoring: Any = None
    # The live NETCONF call-home sessions (`netconf.NetconfSessions`), or None.
    netconf: Any = None

    def sync(self) -> None:
        """Apply changes the admin CLI made to the registry (polled every second)."""
        if self.registry.changed():
            self.sessions.enforce()
