"""
L{ModernTransportMixin}: the transport half of L{callhomehub.sshcrypto}
(see that module for why each piece exists).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.conch.ssh import _kex
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import MSG_CHANNEL_DATA
from twisted.conch.ssh.transport import (
    DISCONNECT_COMPRESSION_ERROR,
    DISCONNECT_PROTOCOL_ERROR,
    MSG_DEBUG,
    MSG_IGNORE,
    MSG_KEXINIT,
    MSG_NEWKEYS,
    MSG_UNIMPLEMENTED,
    SSHCiphers,
    SSHTransportBase,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python import randbytes
from twisted.python.failure import Failure

from callhomehub.sshcrypto_algorithms import (
    CIPHERS,
    COMPRESSIONS,
    HOST_KEY_ALGORITHMS,
    KEX_ALGORITHMS,
    MACS,
    REKEY_DATA_LIMIT,
    REKEY_TIME_LIMIT,
    USERAUTH_SIGNATURE_ALGORITHMS,
)
from callhomehub.sshcrypto_buffers import Bytes, ReceiveBuffer
from callhomehub.sshcrypto_ciphers import ModernSSHCiphers, cipherBlockLimit
from callhomehub.sshcrypto_kex import (
    EXT_INFO_CLIENT,
    EXT_INFO_SERVER,
    STRICT_KEX_CLIENT,
    STRICT_KEX_SERVER,
    KexInit,
    RekeyMeter,
    macNeutralPeerKexInit,
    strictKexAllows,
)
from callhomehub.sshcrypto_packet import PacketError
from callhomehub.sshcrypto_tcpwrite import batch, writeNow

_SEQUENCE_MASK = 0xFFFFFFFF
# Room to leave for a packet beyond its payload: length, padding length,
# padding (under two blocks) and the largest MAC (HMAC-SHA2-512).
_SEAL_OVERHEAD = 4 + 1 + 2 * 16 + 64
_MESSAGE_TYPES = [bytes((n,)) for n in range(256)]

if TYPE_CHECKING:
    _Base = SSHTransportBase
else:
    _Base = object


class ModernTransportMixin(_Base):
    """
    OpenSSH-era algorithms, strict key exchange and rekeying for a Conch
    transport; put it before C{SSHServerTransport}/C{SSHClientTransport}.

    @cvar supportedKeyExchanges: see L{KEX_ALGORITHMS} (clients drop the
        post-quantum hybrids Conch's client lacks).
    @cvar supportedPublicKeys: host key algorithms.  A server's factory sets
        this per connection from its host keys; the mixin then keeps only
        those also in L{hostKeyAlgorithms}, in that order.
    @cvar supportedCiphers: see L{CIPHERS}.
    @cvar supportedMACs: see L{MACS}.
    @cvar serverSigAlgs: what a server announces in C{server-sig-algs}, or
        L{None} to keep Conch's (its host key algorithms).
    @cvar strictKex: whether to offer OpenSSH strict key exchange.
    @cvar rekeyDataLimit: bytes in either direction before new keys are
        negotiated (lowered to the cipher's own limit if that is smaller).
    @cvar rekeyTimeLimit: seconds before new keys are negotiated, or L{None}.
    @cvar clock: the L{IReactorTime} for the time limit; the global reactor
        when left L{None}.
    """

    supportedKeyExchanges = list(KEX_ALGORITHMS)
    supportedPublicKeys = list(HOST_KEY_ALGORITHMS)
    supportedCiphers = list(CIPHERS)
    supportedMACs = list(MACS)
    supportedCompressions = list(COMPRESSIONS)
    hostKeyAlgorithms: tuple[bytes, ...] = HOST_KEY_ALGORITHMS
    serverSigAlgs: tuple[bytes, ...] | None = USERAUTH_SIGNATURE_ALGORITHMS
    strictKex = True
    rekeyDataLimit: int = REKEY_DATA_LIMIT
    rekeyTimeLimit: float | None = REKEY_TIME_LIMIT
    clock: IReactorTime | None = None

    _modernLog = Logger()
    _strict = False
    _initialKex = True
    _peerKexInits = 0
    _lastIncomingSeq = 0
    _holdInput = False
    _inDataReceived = False
    _startingRekey = False
    _disconnectSent = False
    _secured = False
    _rekeyTimer: IDelayedCall | None = None
    _afterInput: list[Callable[[], object]] | None = None
    _meter: RekeyMeter

    # Connection set-up

    def connectionMade(self) -> None:
        self._meter = RekeyMeter(limit=self.rekeyDataLimit)
        self._input = ReceiveBuffer()
        self.supportedPublicKeys = [
            name for name in self.hostKeyAlgorithms if name in self.supportedPublicKeys
        ]
        if self.isClient:
            self.supportedKeyExchanges = [
                name
                for name in self.supportedKeyExchanges
                if not _kex.isPQHybrid(name)
            ]
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancelRekeyTimer()
        super().connectionLost(reason)

    # Key exchange

    def sendKexInit(self) -> None:
        """
        Send KEXINIT; on the first exchange only, with the ext-info and
        strict-kex markers (OpenSSH 9.6 drops them on rekeys too).
        """
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            raise RuntimeError(
                f"Cannot send KEXINIT while key exchange state is "
                f"{self._keyExchangeState!r}"
            )
        kex_algorithms = list(self.supportedKeyExchanges)
        if self.sessionID is None:
            kex_algorithms.append(EXT_INFO_CLIENT if self.isClient else EXT_INFO_SERVER)
            if self.strictKex:
                kex_algorithms.append(
                    STRICT_KEX_CLIENT if self.isClient else STRICT_KEX_SERVER
                )
        lists = [
            kex_algorithms,
            self.supportedPublicKeys,
            self.supportedCiphers,
            self.supportedCiphers,
            self.supportedMACs,
            self.supportedMACs,
            self.supportedCompressions,
            self.supportedCompressions,
            self.supportedLanguages,
            self.supportedLanguages,
        ]
        self.ourKexInitPayload = (
            bytes((MSG_KEXINIT,))
            + randbytes.secureRandom(16)
            + b"".join(NS(b",".join(names)) for names in lists)
            + b"\x00\x00\x00\x00\x00"
        )
        self.sendPacket(MSG_KEXINIT, self.ourKexInitPayload[1:])
        self._keyExchangeState = self._KEY_EXCHANGE_REQUESTED
        self._blockedByKeyExchange = []

    def ssh_KEXINIT(self, packet: bytes) -> None:
        try:
            peer = KexInit.parse(packet)
        except ValueError:
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"malformed KEXINIT")
            return
        if self._peerKexInits == 0:
            marker = STRICT_KEX_SERVER if self.isClient else STRICT_KEX_CLIENT
            self._strict = self.strictKex and marker in peer.kexAlgorithms
            if self._strict and self._lastIncomingSeq != 0:
                self.sendDisconnect(
                    DISCONNECT_PROTOCOL_ERROR,
                    b"strict KEX violation: KEXINIT was not the first packet",
                )
                return
        self._peerKexInits += 1
        # Conch's negotiation fails if MAC lists do not meet even where an
        # AEAD cipher makes MACs irrelevant; give it a copy where they do,
        # and restore the real payload, which the exchange hash covers.
        neutral = macNeutralPeerKexInit(
            self.supportedCiphers, self.supportedMACs, peer, self.isClient
        )
        super().ssh_KEXINIT(neutral.toBytes())
        self.otherKexInitPayload = bytes((MSG_KEXINIT,)) + packet
        if self._disconnectSent:
            return
        agreed = self.nextEncryptions
        self.nextEncryptions = ModernSSHCiphers(
            agreed.outCipType, agreed.inCipType, agreed.outMACType, agreed.inMACType
        )
        self._modernLog.debug(
            "kex: out {outCipher} {outMAC} in {inCipher} {inMAC} strict={strict}",
            outCipher=self.nextEncryptions.outCipType,
            outMAC=self.nextEncryptions.outMACType,
            inCipher=self.nextEncryptions.inCipType,
            inMAC=self.nextEncryptions.inMACType,
            strict=self._strict,
        )

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        if not self.isClient:
            super().ssh_NEWKEYS(packet)  # type: ignore[misc]
            return
        # Conch's client: it never cleared _gotNewKeys, so on a rekey it
        # switched incoming keys before the server's NEWKEYS, and it called
        # connectionSecure (restarting user auth) after every exchange.
        if packet != b"":
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"NEWKEYS takes no data")
            return
        if not self.nextEncryptions.encBlockSize:
            self._gotNewKeys = 1
            return
        self._gotNewKeys = 0
        self._newKeys()
        if not self._secured:
            self._secured = True
            self.connectionSecure()  # type: ignore[attr-defined]

    def _newKeys(self) -> None:
        self._holdInput = False
        limit = self.rekeyDataLimit
        for name in (self.nextEncryptions.outCipType, self.nextEncryptions.inCipType):
            if name != b"none":
                limit = min(limit, cipherBlockLimit(name))
        self._meter.restart(limit)
        self._cancelRekeyTimer()
        if self.rekeyTimeLimit is not None:
            self._rekeyTimer = self._clock().callLater(
                self.rekeyTimeLimit, self._rekeyTimeUp
            )
        super()._newKeys()
        if (
            self._input.pending()
            and not self._inDataReceived
            and not self._disconnectSent
        ):
            # Packets that came after NEWKEYS waited for the new keys.
            self.dataReceived(b"")

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        if not self.isClient and self.serverSigAlgs is not None:
            value = b",".join(self.serverSigAlgs)
            extensions = [
                (name, value if name == b"server-sig-algs" else data)
                for name, data in extensions
            ]
        super().sendExtInfo(extensions)

    # Rekeying

    def _clock(self) -> IReactorTime:
        if self.clock is None:
            from twisted.internet import reactor

            return reactor  # type: ignore[return-value]
        return self.clock

    def _cancelRekeyTimer(self) -> None:
        if self._rekeyTimer is not None and self._rekeyTimer.active():
            self._rekeyTimer.cancel()
        self._rekeyTimer = None

    def _rekeyTimeUp(self) -> None:
        self._rekeyTimer = None
        self._startRekey("time limit")

    def _maybeRekey(self) -> None:
        if self._meter.due:
            self._startRekey("data limit")

    def _startRekey(self, why: str) -> None:
        """
        Begin a key exchange unless one is running or none has finished.
        """
        if (
            self._keyExchangeState != self._KEY_EXCHANGE_NONE
            or self.sessionID is None
            or self._startingRekey
            or self._disconnectSent
        ):
            return
        self._modernLog.info(
            "rekeying: {why} ({out} bytes out, {inb} in)",
            why=why,
            out=self._meter.bytesOut,
            inb=self._meter.bytesIn,
        )
        self._startingRekey = True
        try:
            self.sendKexInit()
        finally:
            self._startingRekey = False

    # Packets

    def _currentCiphers(self) -> ModernSSHCiphers:
        ciphers = self.currentEncryptions
        if not isinstance(ciphers, ModernSSHCiphers):
            assert isinstance(ciphers, SSHCiphers)
            ciphers = self.currentEncryptions = ModernSSHCiphers.adopt(ciphers)
        return ciphers

    def _allowedKeyExchangeMessageType(self, messageType: int) -> bool:
        # Strict kex: nothing but key exchange until the first NEWKEYS.
        if (
            self._strict
            and self._initialKex
            and messageType in (MSG_IGNORE, MSG_DEBUG, MSG_UNIMPLEMENTED)
        ):
            return False
        return bool(super()._allowedKeyExchangeMessageType(messageType))

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
        outbound = self._currentCiphers().outbound
        if batch.collecting(self.transport):
            room = batch.take(len(head) + len(data) + _SEAL_OVERHEAD)
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
        self._meter.sent(sent)
        self._maybeRekey()

    def beginBatch(self) -> bool:
        """
        Gather the packets sent from now on and write them with one system
        call at L{endBatch} (call it only if this answered True).
        """
        return batch.begin(self.transport)

    def endBatch(self) -> None:
        batch.end()

    # Conch's own code (the version exchange) sees the receive buffer as
    # self.buf.

    _input: ReceiveBuffer

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
        try:
            opened = self._currentCiphers().inbound.openFrom(
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
                self._modernLog.failure("Error decompressing payload")
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
        Run C{action} once the packets of the data being received are all
        dispatched (so that a consumer can write what several packets
        carried with one system call); False, and nothing is kept, when
        nothing is being received.
        """
        if not self._inDataReceived:
            return False
        if self._afterInput is None:
            self._afterInput = []
        self._afterInput.append(action)
        return True

    def _runAfterInput(self) -> None:
        while self._afterInput:
            actions, self._afterInput = self._afterInput, None
            for action in actions:
                try:
                    action()
                except Exception:
                    self._modernLog.failure("after-input action failed")

    def dataReceived(self, data: bytes) -> None:
        if self._inDataReceived:  # reentered (a synchronous peer in tests)
            self._dataReceived(data)
            return
        self._inDataReceived = True
        try:
            self._dataReceived(data)
        finally:
            self._inDataReceived = False
            self._runAfterInput()

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
        the service takes it that way (C{channelDataView}, see
        L{callhomehub.sshconnection.WindowedChannelsMixin}); False to
        dispatch it as usual.
        """
        if self._initialKex:
            return False  # before the first NEWKEYS it is a strict-kex error
        take = getattr(self.service, "channelDataView", None)
        if take is None or not take(payload):
            return False
        self._maybeRekey()
        return True

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if (
            self._strict
            and self._initialKex
            and not strictKexAllows(messageNum, self.isClient, self._peerKexInits > 0)
        ):
            self.sendDisconnect(
                DISCONNECT_PROTOCOL_ERROR,
                b"strict KEX violation: unexpected packet type %d (seqnr %d)"
                % (messageNum, self._lastIncomingSeq),
            )
            return
        if messageNum == MSG_NEWKEYS:
            self._initialKex = False
        super().dispatchMessage(messageNum, payload)
        self._maybeRekey()

    def sendUnimplemented(self) -> None:
        # Conch reports the sequence number after the offending packet's.
        self.sendPacket(MSG_UNIMPLEMENTED, struct.pack("!L", self._lastIncomingSeq))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self._disconnectSent = True
        self._cancelRekeyTimer()
        super().sendDisconnect(reason, desc)

