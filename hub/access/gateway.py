"""The console gateway and jump host: what an operator may do through the hub.

`ssh alice@hub` with a pty gets a chooser of the nodes alice may reach;
`ssh alice:NODE@hub [command]` goes straight to NODE (`alice:NODE:PORT` to a
serial port); `direct-tcpip` to a node name (`ssh -J`, `-W`, `-L`) reaches the
node's forwarded service end to end. Every device is reached through its tunnel
with the hub's management key; nothing is contacted before the grant check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import connection
from twisted.logger import Logger

from hub.access.needs import GatewayNeeds
from hub.access.reach import OperatorReach
from hub.access.session import GatewaySession
from hub.access.session import stamp as _stamp
from hub.rules.logins import OperatorLogin, may_reach
from hub.ssh.connection import ChannelRefused
from hub.ssh.wire import WireError, text, unpack_tcpip_open
from hub.tunnel.dial import OpenNotice
from hub.tunnel.live import close_connection
from hub.tunnel.relay import RelayChannel

log = Logger()


class OperatorAvatar(OperatorReach, ConchUser):
    """An operator logged in to the hub over SSH."""

    def __init__(self, needs: GatewayNeeds, login: OperatorLogin, peer: Callable[[], str]
                 ) -> None:
        ConchUser.__init__(self)
        OperatorReach.__init__(self, needs, login, peer)
        self.conn: Any = None

    def connection_started(self, conn: Any) -> None:
        if self.needs.operators is not None:
            self.needs.operators.add(self)

    def logout(self) -> None:
        if self.needs.operators is not None:
            self.needs.operators.discard(self)

    # -- re-checked when the registry changes (hub.access.operators) -------------

    def end(self, why: str) -> None:
        """The login no longer stands: disconnect, telling the operator why."""
        log.info("{actor}: {why}, disconnecting", actor=self.actor, why=why)
        if self.conn is not None:
            close_connection(self.conn, self.needs.clock, why)

    def narrow(self, allow: tuple[str, ...]) -> None:
        """Close the gateway sessions and jump channels to nodes `allow` no longer grants."""
        if self.conn is None:
            return
        for chan in list(self.conn.channels.values()):
            if isinstance(chan, GatewaySession | JumpChannel):
                chan.narrow(allow)

    def lookupChannel(self, channel_type: bytes, window: int, max_packet: int,
                      data: bytes) -> Any:
        if channel_type == b"session":
            return GatewaySession(self, remoteWindow=window, remoteMaxPacket=max_packet)
        if channel_type == b"direct-tcpip":
            return self.jump(data, window, max_packet)
        raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                             f"channel type {channel_type.decode('ascii', 'replace')} "
                             "is not offered by the gateway")

    def jump(self, data: bytes, window: int, max_packet: int) -> Any:
        try:
            request = unpack_tcpip_open(data)
            name = text(request.host, "host")
        except WireError as e:
            raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"malformed direct-tcpip request: {e}") from None
        # The grants are read off the reactor; the channel opens once checked.
        return self.checked(name).addCallback(self._jump, name, request, window, max_packet)

    def _jump(self, reach: OperatorReach, name: str, request: Any, window: int,
              max_packet: int) -> Any:
        port = request.port
        node, tunnel = reach.resolve(name)
        operator = JumpChannel(node.name, remoteWindow=window, remoteMaxPacket=max_packet)
        device = JumpDeviceChannel()
        operator.relay_peer, device.relay_peer = device, operator
        started = self.needs.clock.seconds()

        def audit() -> None:
            self.needs.grants.audit(
                self.actor, "jump", node.name,
                f"port {port} start {_stamp(started)} end {_stamp(self.needs.clock.seconds())}"
                f" bytes to-device {operator.relay_bytes_in} from-device {device.relay_bytes_in}")
        opened = tunnel.dial(port, device, (request.origin, request.origin_port))
        if not opened.called:  # a port the node does not forward is refused at once
            operator.on_close = audit
            log.info("{actor}: jump to {node}:{port}", actor=self.actor, node=node.name,
                     port=port)
        return opened.addCallback(lambda _: self.checked(operator.node)).addCallback(
            self._still_granted, operator, device)

    def _still_granted(self, reach: OperatorReach, operator: JumpChannel,
                       device: JumpDeviceChannel) -> JumpChannel:
        # The grant may have been withdrawn while the device end was opening.
        user = reach.user()
        if user is None or not may_reach(user.allow, operator.node):
            device.relay_peer = None
            device.loseConnection()
            raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"access to node {operator.node} was withdrawn")
        return operator

    def gotGlobalRequest(self, request_type: bytes, data: bytes) -> Any:
        return 0


class JumpChannel(RelayChannel):
    """The operator end of a jump-host relay to `node`."""

    # Confirmed after the device end opens and the grant is read again.
    relay_pending = True

    def __init__(self, node: str, **kw: Any) -> None:
        RelayChannel.__init__(self, b"direct-tcpip", **kw)
        self.node = node

    def narrow(self, allow: tuple[str, ...]) -> None:
        if may_reach(allow, self.node) or not self.relay_open():
            return
        log.info("access to node {node} withdrawn: closing a jump channel", node=self.node)
        peer = self.relay_peer
        if peer is not None and peer.relay_open():
            peer.loseConnection()
        self.loseConnection()


class JumpDeviceChannel(OpenNotice, RelayChannel):
    """The device end of a jump-host relay; the operator's open waits for it."""

    def __init__(self) -> None:
        RelayChannel.__init__(self, b"forwarded-tcpip")

    def channelOpen(self, specificData: bytes) -> None:
        RelayChannel.channelOpen(self, specificData)
        self.notify_open()

    def openFailed(self, reason: Any) -> None:
        self.notify_failed(reason)
