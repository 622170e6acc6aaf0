"""
L{PacketIOMixin}: how the transport of L{hub.ssh.modern} turns
payloads into packets on the wire and back, with as few copies and system
calls as sshd makes: sealed straight from a channel's read buffer, several
packets to one C{send} (L{beginBatch}), received packets opened in place
in the read, channel data handed on as a view (C{channelDataView}) and what
one read carried written out together (L{callAfterInput}).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh.connection import MSG_CHANNEL_DATA
from twisted.conch.ssh.transport import (
    DISCONNECT_COMPRESSION_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MSG_NEWKEYS,
    SSHCiphers,
    SSHTransportBase,
)
from twisted.logger import Logger
from zope.interface import implementer

from hub.ssh.buffers import Bytes, ReceiveBuffer
from hub.ssh.ciphers import ModernSSHCiphers
from hub.ssh.iogroup import InputRound, IOGroup
from hub.ssh.kex import RekeyMeter
from hub.ssh.packet import PacketError
from hub.ssh.sink import IChannelDataViews, IPacketSink
from hub.ssh.tcpwrite import OutputBatch, writeNow

_SEQUENCE_MASK = 0xFFFFFFFF
# Room to leave for a packet beyond its payload: length, padding length,
# padding (under two blocks) and the largest MAC (HMAC-SHA2-512).
SEAL_OVERHEAD = 4 + 1 + 2 * 16 + 64
_MESSAGE_TYPES = [bytes((n,)) for n in range(256)]


if TYPE_CHECKING:
    _Base = SSHTransportBase
else:
    _Base = object


@implementer(IPacketSink)
class PacketIOMixin(_Base):
    """
    The packet layer of L{hub.ssh.modern.ModernTransportMixin}, which
    keeps the state below up to date (key exchange, rekeying).

    @cvar ioGroup: the L{IOGroup} this transport shares with the others of
        its factory (set on the instance before C{connectionMade}); a group of
        its own when left L{None}.
    """

    ioGroup: IOGroup | None = None

    _ioLog = Logger()
    _strict = False
    _initialKex = True
    _lastIncomingSeq = 0
    _holdInput = False
    _inDataReceived = False
    _disconnectSent = False
    _meter: RekeyMeter
    _input: ReceiveBuffer
    # The group's round and batch, looked up once per packet as the module
    # globals they replace were.
    _round: InputRound
    _batch: OutputBatch
    _takeDataView: Callable[[memoryview], bool] | None = None

    def _joinIOGroup(self) -> None:
        """
        Take the round and batch of L{ioGroup} (called by C{connectionMade}).
        """
        if self.ioGroup is None:
            self.ioGroup = IOGroup()
        self._round = self.ioGroup.round
        self._batch = self.ioGroup.batch

    def setService(self, service: Any) -> None:
        # The upward hook for channel data, found once per service.
        self._takeDataView = (
            service.channelDataView if IChannelDataViews.providedBy(service) else None
        )
        super().setService(service)

    def _maybeRekey(self) -> None:
        """
        Start a key exchange if one is due (the transport's business).
        """

    def _currentCiphers(self) -> ModernSSHCiphers:
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, ModernSSHCiphers):
            assert isinstance(ciphers, SSHCiphers)
            ciphers = self.currentEncryptions = ModernSSHCiphers.adopt(ciphers)
        return ciphers

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.sendPacketParts(messageType, b"", payload)

    def sendPacketParts(self, messageType: int, head: bytes, data: Bytes) -> None:
        """
        L{sendPacket} for the payload C{head + data}, which is framed,
        sealed and written without joining the parts (a channel's data goes
        from its TCP read buffer into the packet buffer in one copy).
        """
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            if not self._allowedKeyExchangeMessageType(messageType):
                self._blockedByKeyExchange.append((messageType, head + bytes(data)))
                return
        head = _MESSAGE_TYPES[messageType] + head
        if self.outgoingCompression:
            data = self.outgoingCompression.compress(
                head + bytes(data)
            ) + self.outgoingCompression.flush(zlib.Z_SYNC_FLUSH)
            head = b""
        seqnr = self.outgoingPacketSequence
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, ModernSSHCiphers):  # _currentCiphers, inline
            ciphers = self._currentCiphers()
        outbound = ciphers.outbound
        batch = self._batch
        if batch.collecting(self.transport):
            room = batch.take(len(head) + len(data) + SEAL_OVERHEAD)
            wire = outbound.sealInto(seqnr, head, data, room)
            sent = len(wire)
            batch.commit(wire)
        else:
            wire = outbound.sealInto(seqnr, head, data)
            sent = len(wire)
            writeNow(self.transport, wire)
        self.outgoingPacketSequence = (seqnr + 1) & _SEQUENCE_MASK
        if messageType == MSG_NEWKEYS and self._strict:
            self.outgoingPacketSequence = 0
        if self._meter.sent(sent):
            self._maybeRekey()

    def sendChannelData(self, recipient: int, data: Bytes, maxPacket: int) -> bool:
        """
        All of C{data} as CHANNEL_DATA packets to channel C{recipient}, sealed
        with one call of the C packet layer into the output batch (what a
        channel writes from one read: 8 packets of 32 KiB from a 256 KiB
        read); False, with nothing sent, where that cannot be done (no batch
        gathering for this transport, a key exchange under way, compression,
        or a protection without its C object): the caller then sends the
        packets one L{sendPacketParts} at a time.
        """
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE or self.outgoingCompression:
            return False
        ciphers = self.currentEncryptions
        batch = self._batch
        if not isinstance(ciphers, ModernSSHCiphers) or not batch.collecting(self.transport):
            return False
        outbound = ciphers.outbound
        if getattr(outbound, "_c", None) is None:
            return False
        count = -(-len(data) // maxPacket)
        room = batch.take(len(data) + count * (9 + SEAL_OVERHEAD))
        sealed = outbound.sealDataInto(  # type: ignore[attr-defined]
            self.outgoingPacketSequence, recipient, data, maxPacket, room)
        sent, used = sealed
        batch.commit(room[:used])
        self.outgoingPacketSequence = (self.outgoingPacketSequence + sent) & _SEQUENCE_MASK
        if self._meter.sentMany(used, sent):
            self._maybeRekey()
        return True

    def beginBatch(self) -> bool:
        """
        Gather the packets sent from now on and write them with one system
        call at L{endBatch} (call it only if this answered True).
        """
        return self._batch.begin(self.transport)

    def endBatch(self) -> None:
        self._batch.end()

    # Conch's own code (the version exchange) sees the receive buffer as
    # self.buf.

    @property
    def buf(self) -> bytes:
        return self._input.rest()

    @buf.setter
    def buf(self, value: bytes) -> None:
        self._input = ReceiveBuffer(value)

    def _nextPayload(self) -> memoryview | None:
        """
        The payload (message number first) of the next whole packet
        received, valid until the next call; L{None} if there is none yet,
        input is held, or the connection is being dropped.
        """
        if self._holdInput or self._disconnectSent:
            return None
        seqnr = self.incomingPacketSequence
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, ModernSSHCiphers):  # _currentCiphers, inline
            ciphers = self._currentCiphers()
        try:
            opened = ciphers.inbound.openFrom(
                seqnr, self._input.data, self._input.pos
            )
        except PacketError as e:
            self.sendDisconnect(e.reason, e.description)
            return None
        if opened is None:
            return None
        payload, used = opened
        self._input.advance(used)
        if self.incomingCompression:
            try:
                payload = memoryview(self.incomingCompression.decompress(payload))
            except Exception:
                self._ioLog.failure("Error decompressing payload")
                self.sendDisconnect(DISCONNECT_COMPRESSION_ERROR, b"compression error")
                return None
        if not payload:
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"empty packet")
            return None
        self._lastIncomingSeq = seqnr
        self.incomingPacketSequence = (seqnr + 1) & _SEQUENCE_MASK
        self._meter.received(used)
        if payload[0] == MSG_NEWKEYS:
            if self._strict:
                self.incomingPacketSequence = 0
            # What follows NEWKEYS is under the new keys, which the client
            # may not have yet (host key check pending).
            self._holdInput = True
        return payload

    def getPacket(self) -> bytes | None:
        payload = self._nextPayload()
        return None if payload is None else payload.tobytes()

    def callAfterInput(self, action: Callable[[], object]) -> bool:
        """
        Run C{action} once the data being received is all dispatched: the
        outermost transport's, when transports nest (the hub's SSH client to
        a device runs inside a device's tunnel), so that a consumer can write
        what several packets carried with one system call.  False, and
        nothing is kept, when nothing is being received.
        """
        return self._round.defer(action)

    def dataReceived(self, data: bytes) -> None:
        if self._inDataReceived:  # reentered (a synchronous peer in tests)
            self._dataReceived(data)
            return
        self._inDataReceived = True
        round_ = self._round
        round_.depth += 1
        try:
            self._dataReceived(data)
        finally:
            self._inDataReceived = False
            round_.depth -= 1
            if not round_.depth:
                round_.run()

    def _dataReceived(self, data: bytes) -> None:
        if not self.gotVersion:
            super().dataReceived(data)  # the version line, then getPacket
            return
        if self._disconnectSent:
            return
        if data:
            self._input.append(data, self._currentCiphers().inbound.wanted)
        # Conch's loop, less a copy per packet: the payload is copied
        # once, from the decrypted packet, into the bytes dispatched.
        while (payload := self._nextPayload()) is not None:
            number = payload[0]
            if number == MSG_CHANNEL_DATA and self._channelDataView(payload):
                continue
            rest = payload[1:].tobytes()
            payload.release()
            self.dispatchMessage(number, rest)

    def _channelDataView(self, payload: memoryview) -> bool:
        """
        Hand a CHANNEL_DATA packet to the service without copying it, if
        the service takes it that way (L{IChannelDataViews}, see
        L{hub.ssh.connection.WindowedChannelsMixin}); False to
        dispatch it as usual.
        """
        if self._initialKex:
            return False  # before the first NEWKEYS it is a strict-kex error
        take = self._takeDataView
        if take is None or not take(payload):
            return False
        self._maybeRekey()
        return True
