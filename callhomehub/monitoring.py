"""Monitoring intake: NSCA results in, latest state and bounded history out.

Results arrive through the in-tunnel intake (a device's `direct-tcpip` to
localhost:5667, served in-process on an SSH channel) or the optional plain TCP
listener (`--nsca`). Each is attributed to the node whose tunnel carried it,
checked against strict-host mode, stored (history bounded per host/service so
a chatty device cannot fill the disk) and written to the command file.
"""

from __future__ import annotations

from typing import Any

from attrs import define, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .commandfile import CommandFileWriter
from .config import NSCAConfig
from .nsca import CheckResult, NSCAServerFactory, NSCAServerProtocol, NSCASettings, format_command
from .registry import Registry
from .splice import ProtocolChannel

log = Logger()


@frozen
class Status:
    node: str
    host: str
    service: str
    code: int
    output: str
    time: float


@define(eq=False)
class Monitoring:
    registry: Registry
    config: NSCAConfig
    clock: IReactorTime
    command_file: CommandFileWriter | None = None

    @property
    def settings(self) -> NSCASettings:
        return NSCASettings(method=self.config.encryption, password=self.config.password,
                            max_age=self.config.max_age)

    def deliver(self, node: str, result: CheckResult) -> None:
        """Keep one result from `node` ("" for the plain TCP listener)."""
        if self.config.strict_host and node and result.host.lower() != node.lower():
            log.warn("NSCA result for host {host!r} from node {node} dropped (strict_host)",
                     host=result.host, node=node)
            return
        now = self.clock.seconds()
        with self.registry.transaction() as db:
            db.execute(
                "INSERT INTO results (node, host, service, code, output, time, received)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (node, result.host, result.service, result.code, result.output,
                 result.timestamp, now))
            # Everything at or below the oldest id to drop, found through the
            # (host, service, id) index: cheap whatever the history length.
            db.execute(
                "DELETE FROM results WHERE host = ? AND service = ? AND id <="
                " (SELECT id FROM results WHERE host = ? AND service = ?"
                "  ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (result.host, result.service, result.host, result.service,
                 self.config.history))
        if self.command_file is not None:
            self.command_file.write(format_command(result, int(now)))

    def tcp_factory(self) -> NSCAServerFactory:
        return NSCAServerFactory(self.settings, lambda r: self.deliver("", r), self.clock)

    def channel_factory(self, avatar: Any, window: int, max_packet: int) -> NSCAChannel:
        return NSCAChannel(self, avatar.node or "", avatar.actor, remoteWindow=window,
                           remoteMaxPacket=max_packet)


def status(registry: Registry, node: str | None = None) -> list[Status]:
    """The latest result of every host/service (of one node's results if given)."""
    rows = registry.query(
        "SELECT node, host, service, code, output, time FROM results"
        " WHERE id IN (SELECT MAX(id) FROM results GROUP BY host, service)"
        " AND (? IS NULL OR node = ? COLLATE NOCASE)"
        " ORDER BY host, service", (node, node))
    return [Status(*row) for row in rows]


class NSCAChannel(ProtocolChannel):
    """A `direct-tcpip` channel to localhost:5667, answered by the in-process intake."""

    name = b"direct-tcpip"

    def __init__(self, monitoring: Monitoring, node: str, actor: str, **kw: Any) -> None:
        ProtocolChannel.__init__(self, **kw)
        self.protocol = NSCAServerProtocol(
            monitoring.settings, lambda r: monitoring.deliver(node, r), monitoring.clock,
            peer=actor)
