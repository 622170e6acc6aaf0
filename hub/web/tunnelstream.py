"""A byte stream into a device through its tunnel, as a Twisted client endpoint.

`TunnelEndpoint.connect` dials the node's forward with `NodeTunnel.dial` (the one
way into a device) and runs the factory's protocol on the `forwarded-tcpip`
channel, so `twisted.web.client.Agent` (or TLS over it) speaks HTTP to the
device's web server. Flow control both ways: the protocol's producer is paused
while the device's window is used up, and the device gets new window only for
data the protocol took while it was not paused.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import channel
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hub.ssh.channels import MAX_PACKET, WINDOW, PacketWriteMixin
from hub.tunnel.dial import OpenNotice
from hub.tunnel.live import NodeTunnel

log = Logger()


@implementer(ITransport, IConsumer, IPushProducer)
class ChannelStream:
    """The protocol's transport: writes go to the channel, reads are granted window."""

    disconnecting = False
    producer: Any = None

    def __init__(self, chan: StreamChannel) -> None:
        self.chan = chan
        self.paused = False  # the protocol asked us to stop delivering data
        self._unacked = 0

    # -- protocol -> device --------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.disconnecting and data:
            self.chan.write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if not self.chan.areWriting:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # -- device -> protocol: window only for what the protocol has taken -----
    def received(self, size: int) -> None:
        self._unacked += size
        self._grant()

    def _grant(self) -> None:
        if self.paused or self.chan.closing or self._unacked < WINDOW // 4:
            return
        granted, self._unacked = self._unacked, 0
        self.chan.conn.adjustWindow(self.chan, granted)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._grant()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- the rest of ITransport ----------------------------------------------
    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.chan.loseConnection()  # after what is buffered for the device

    def abortConnection(self) -> None:
        self.disconnecting = True
        if not self.chan.localClosed and self.chan.conn is not None:
            self.chan.conn.sendClose(self.chan)

    # What TCP-minded protocols (TLS, the HTTP client) may ask of a transport.
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)


class StreamChannel(OpenNotice, PacketWriteMixin, channel.SSHChannel):
    """The `forwarded-tcpip` channel a `ChannelStream` runs on."""

    manages_window = True
    conn: Any
    abandoned = False  # the connect was cancelled before the device confirmed

    def __init__(self, protocol: Any) -> None:
        channel.SSHChannel.__init__(self, localWindow=WINDOW, localMaxPacket=MAX_PACKET)
        self.name = b"forwarded-tcpip"
        self.protocol = protocol
        self.stream = ChannelStream(self)
        self._connected = False

    def channelOpen(self, specificData: bytes) -> None:
        if self.abandoned:
            self.loseConnection()
            return
        self._connected = True
        try:
            self.protocol.makeConnection(self.stream)
        except Exception as e:
            # Our protocol's fault, not the device's: close this channel only,
            # never the node's SSH connection (Conch would drop it).
            log.failure("web proxy stream to the device failed to start")
            self._connected = False
            self.notify_failed(e)
            self.loseConnection()
            return
        self.notify_open()

    def openFailed(self, reason: Any) -> None:
        self.notify_failed(reason)

    def dataReceived(self, data: bytes) -> None:
        self.stream.received(len(data))
        self.protocol.dataReceived(bytes(data))

    def eofReceived(self) -> None:
        self.loseConnection()  # HTTP: the device is done; the response ends here

    def stopWriting(self) -> None:
        if self.stream.producer is not None:
            self.stream.producer.pauseProducing()

    def startWriting(self) -> None:
        if self.stream.producer is not None:
            self.stream.producer.resumeProducing()

    def closed(self) -> None:
        if self._connected:
            self._connected = False
            clean = self.stream.disconnecting or self.remoteClosed
            self.protocol.connectionLost(Failure(ConnectionDone() if clean
                                                 else ConnectionLost()))


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connections to one forward (`service`) of a node, through its tunnel."""

    def __init__(self, tunnel: NodeTunnel, service: str) -> None:
        self.tunnel = tunnel
        self.service = service

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        protocol = protocolFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        chan = StreamChannel(protocol)

        def cancel(d: defer.Deferred[Any]) -> None:
            chan.abandoned = True
            if chan.stream is not None and chan._connected:
                chan.stream.abortConnection()

        connected: defer.Deferred[Any] = defer.Deferred(cancel)

        def opened(_: object) -> None:
            if not connected.called:
                connected.callback(protocol)

        def failed(f: Failure) -> None:
            if not connected.called:
                connected.errback(f)

        self.tunnel.dial(self.service, chan).addCallbacks(opened, failed)
        return connected
