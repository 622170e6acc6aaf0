"""The two seams between the hub's channels and the SSH transport under them.

Downwards, a channel's writes go to an `IPacketSink`: the hub's transport
(`hub.ssh.packetio.PacketIOMixin`) is one itself, sealing a channel's data
straight from the caller's buffer and sending several packets with one
system call; any other transport (a stock Conch one) is wrapped once in a
`PlainSink`, which sends what Conch's `SSHConnection.sendData` would.
Upwards, a connection service that provides `IChannelDataViews` is handed
CHANNEL_DATA packets as views of the transport's packet buffer.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.conch.ssh.transport import SSHTransportBase
from zope.interface import Interface, implementer

from hub.ssh.buffers import Bytes


class IPacketSink(Interface):
    """What a channel's writes need from the SSH transport under it."""

    def sendPacketParts(messageType: int, head: bytes, data: Bytes) -> None:  # noqa: N805 (zope)
        """Send the packet whose payload is `head + data`, without joining them."""

    def sendChannelData(recipient: int, data: Bytes, maxPacket: int) -> bool:  # noqa: N805
        """Send all of `data` as CHANNEL_DATA packets to channel `recipient`, at
        most `maxPacket` bytes each, in one go if this sink can (into a batch
        that is gathering); False, with nothing sent, if the caller must send
        them one `sendPacketParts` at a time."""

    def beginBatch() -> bool:
        """Gather the packets sent from now on, to write them with one system
        call at `endBatch`; call `endBatch` only if this answered True."""

    def endBatch() -> None:
        """Write what was gathered since `beginBatch`."""

    def callAfterInput(action: Callable[[], object]) -> bool:  # noqa: N805 (zope)
        """Run `action` once the data being received is all dispatched; False,
        and nothing is kept, when nothing is being received."""


class IChannelDataViews(Interface):
    """A connection service that takes channel data without a copy."""

    def channelDataView(payload: memoryview) -> bool:  # noqa: N805 (zope)
        """Take a CHANNEL_DATA packet (`payload` from its message number on,
        valid only during this call); False leaves it to be dispatched as usual."""


@implementer(IPacketSink)
class PlainSink:
    """`IPacketSink` for a transport that is not the hub's: each packet is
    sent on its own, with no batching and no waiting for input to end."""

    def __init__(self, transport: SSHTransportBase) -> None:
        self._transport = transport

    def sendPacketParts(self, messageType: int, head: bytes, data: Bytes) -> None:
        self._transport.sendPacket(messageType, head + bytes(data))

    def sendChannelData(self, recipient: int, data: Bytes, maxPacket: int) -> bool:
        return False

    def beginBatch(self) -> bool:
        return False

    def endBatch(self) -> None:
        pass

    def callAfterInput(self, action: Callable[[], object]) -> bool:
        return False


def sink_for(transport: SSHTransportBase) -> IPacketSink:
    """The `IPacketSink` of `transport`: itself if it is one, else a `PlainSink`."""
    if IPacketSink.providedBy(transport):
        return transport  # type: ignore[return-value]
    return PlainSink(transport)
