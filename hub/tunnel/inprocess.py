"""In-process protocols on an SSH channel: the channel is the protocol's transport.

Used by the hub's SSH client to a device (over a `forwarded-tcpip` channel)
and by the in-tunnel NSCA intake.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import channel

from hub.tunnel.traffic import Traffic


class ChannelTransport:
    """Just enough of ITransport for an in-process protocol to run on a channel
    (the hub's SSH client to a device, the NSCA intake)."""

    disconnecting = False

    def __init__(self, chan: Any) -> None:
        self.chan = chan

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
            self.chan.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.chan.loseConnection()

    abortConnection = loseConnection

    def getPeer(self) -> Any:
        return self.chan.conn.transport.getPeer()

    def getHost(self) -> Any:
        return self.chan.conn.transport.getHost()


class ProtocolChannel(channel.SSHChannel):
    """Runs an in-process protocol over a channel (the hub's SSH client to a
    device, the NSCA intake): the channel is that protocol's transport."""

    conn: Any
    protocol: Any
    # Set by NodeTunnel.dial (the hub's SSH client to a device): bytes through tunnels.
    traffic: Traffic | None = None

    def channelOpen(self, specificData: bytes) -> None:
        self.protocol.makeConnection(ChannelTransport(self))

    def dataReceived(self, data: bytes) -> None:
        if self.traffic is not None:
            self.traffic.from_device += len(data)
        self.protocol.dataReceived(data)

    def write(self, data: bytes) -> None:
        if self.traffic is not None:
            self.traffic.to_device += len(data)
        channel.SSHChannel.write(self, data)

    def eofReceived(self) -> None:
        self.loseConnection()

    def closed(self) -> None:
        self.protocol.connectionLost(None)
