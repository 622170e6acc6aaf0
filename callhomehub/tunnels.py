"""Live device sessions: one per node, takeover on reconnect, drop on revoke.

A node that connects again takes over at once (the old connection may be a
NAT-rebound ghost that would otherwise linger until keepalives time out);
a node revoked or removed through the CLI is dropped when the hub notices the
registry change.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.conch.ssh import transport
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .errors import NotFound
from .registry import Registry

log = Logger()

# How long a connection we closed may take to flush its disconnect message.
CLOSE_GRACE = 5.0


def close_connection(conn: Any, clock: IReactorTime, why: str) -> None:
    """Tell the peer why, then make sure the TCP connection really goes away."""
    ssh_transport = conn.transport
    tcp = ssh_transport.transport
    if tcp is None or getattr(tcp, "disconnected", False):
        return
    ssh_transport.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, why.encode())
    # A dead peer never drains what we wrote; do not wait for TCP to time out.
    clock.callLater(CLOSE_GRACE, lambda: None if tcp.disconnected else tcp.abortConnection())


@define(eq=False)
class LiveSessions:
    """Which connection carries each node now."""

    registry: Registry
    clock: IReactorTime
    _live: dict[str, Any] = field(factory=dict)

    def attach(self, node: str, conn: Any, peer: str) -> None:
        key = node.lower()
        old = self._live.get(key)
        self._live[key] = conn
        if old is not None and old is not conn:
            log.info("node {node} reconnected from {peer}: closing its old session",
                     node=node, peer=peer)
            close_connection(old, self.clock, "superseded by a new connection of this node")
        self.registry.mark_online(node, peer)
        log.info("node {node} online from {peer}", node=node, peer=peer)

    def detach(self, node: str, conn: Any) -> None:
        key = node.lower()
        if self._live.get(key) is conn:
            del self._live[key]
            self.registry.mark_offline(node)
            log.info("node {node} offline", node=node)

    def get(self, node: str) -> Any | None:
        return self._live.get(node.lower())

    def online(self) -> list[str]:
        return sorted(self._live)

    def enforce(self) -> None:
        """Drop the sessions of nodes that were revoked or removed."""
        for key, conn in list(self._live.items()):
            try:
                state = self.registry.node(key).state
            except NotFound:
                state = "removed"
            if state in ("revoked", "removed"):
                log.info("node {node} {state}: dropping its live session", node=key, state=state)
                del self._live[key]
                if state == "revoked":
                    self.registry.mark_offline(key)
                close_connection(conn, self.clock, f"node {key} was {state} on the hub")
