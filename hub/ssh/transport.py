"""
L{ModernTransportMixin}: the transport half of L{hub.ssh.modern}
(see that module for why each piece exists): set-up, key exchange, strict
kex and rekeying; packets on the wire are L{hub.ssh.packetio}.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import _kex
from twisted.conch.ssh import transport as _conch_transport
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.transport import (
    DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
    DISCONNECT_PROTOCOL_ERROR,
    MSG_DEBUG,
    MSG_DISCONNECT,
    MSG_IGNORE,
    MSG_KEXINIT,
    MSG_NEWKEYS,
    MSG_UNIMPLEMENTED,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python import randbytes
from twisted.python.failure import Failure

from hub.ssh.algorithms import (
    CIPHERS,
    COMPRESSIONS,
    HOST_KEY_ALGORITHMS,
    KEX_ALGORITHMS,
    MACS,
    REKEY_DATA_LIMIT,
    REKEY_TIME_LIMIT,
    USERAUTH_SIGNATURE_ALGORITHMS,
)
from hub.ssh.buffers import ReceiveBuffer
from hub.ssh.ciphers import ModernSSHCiphers, cipherBlockLimit
from hub.ssh.disconnect import disconnect_text
from hub.ssh.kex import (
    EXT_INFO_CLIENT,
    EXT_INFO_SERVER,
    STRICT_KEX_CLIENT,
    STRICT_KEX_SERVER,
    KexInit,
    RekeyMeter,
    macNeutralPeerKexInit,
    strictKexAllows,
)
from hub.ssh.loglevel import GatedLogger
from hub.ssh.packetio import PacketIOMixin
from hub.ssh.tcpwrite import no_delay


class ModernTransportMixin(PacketIOMixin):
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

    # Conch's per-connection debug lines, dropped before they are built.
    _log = GatedLogger()

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

    _modernLog = GatedLogger()
    _peerKexInits = 0
    _startingRekey = False
    _secured = False
    _rekeyTimer: IDelayedCall | None = None

    # Connection set-up

    def connectionMade(self) -> None:
        no_delay(self.transport)  # when it runs on TCP (not inside a channel)
        self._joinIOGroup()
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

    # The connection under the transport (TCP, or a channel of another
    # transport), for the services above: they need not reach through.

    def disconnectNow(self, reason: int, description: bytes) -> None:
        """
        Send DISCONNECT and drop the connection at once, without waiting for
        what is queued: a dead peer never reads it.
        """
        self.sendDisconnect(reason, description)
        lower: Any = self.transport
        if lower is not None:
            lower.abortConnection()

    def disconnectWithin(self, seconds: float, clock: IReactorTime, reason: int,
                         description: bytes) -> None:
        """
        Send DISCONNECT, then drop the connection if the peer has not closed
        it within C{seconds}: a dead peer never drains what was written.
        """
        lower: Any = self.transport
        if lower is None or lower.disconnected:
            return
        self.sendDisconnect(reason, description)
        clock.callLater(seconds,
                        lambda: None if lower.disconnected else lower.abortConnection())

    def isDisconnecting(self) -> bool:
        """
        Whether the connection under this transport is gone or closing.
        """
        lower: Any = self.transport
        return lower is None or bool(lower.disconnecting)

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

    def _allowedKeyExchangeMessageType(self, messageType: int) -> bool:
        # Strict kex: nothing but key exchange until the first NEWKEYS.
        if (
            self._strict
            and self._initialKex
            and messageType in (MSG_IGNORE, MSG_DEBUG, MSG_UNIMPLEMENTED)
        ):
            return False
        return bool(super()._allowedKeyExchangeMessageType(messageType))

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
        # The one boundary between the peer's bytes and Conch's handlers,
        # which index, unpack and look up without checking: whatever a
        # packet makes them raise is the peer's protocol error.  (A try
        # costs nothing until something is raised.)
        try:
            super().dispatchMessage(messageNum, payload)
        except Exception as e:
            self._dropMalformed(messageNum, e)
            return
        self._maybeRekey()

    def _dropMalformed(self, messageNum: int, error: Exception) -> None:
        """
        End the connection over a packet the handlers could not take: one
        log line with what was wrong, DISCONNECT (protocol error) to the peer.
        """
        name = messageName(messageNum, self.service)
        description = b"malformed or unexpected %s" % name.encode("ascii")
        self._modernLog.warn(
            "{peer}: {description} ({error}); disconnecting, code {code}",
            peer=peerOf(self),
            description=description,
            error=f"{type(error).__name__}: {error}",
            code=DISCONNECT_PROTOCOL_ERROR,
        )
        if self._disconnectSent:
            return
        self._disconnectSent = True
        self._cancelRekeyTimer()
        # Conch's sendDisconnect, less its second log line.
        self.sendPacket(
            MSG_DISCONNECT,
            struct.pack(">L", DISCONNECT_PROTOCOL_ERROR) + NS(description) + NS(b""),
        )
        lower: Any = self.transport
        lower.loseConnection()

    def sendUnimplemented(self) -> None:
        # Conch reports the sequence number after the offending packet's.
        self.sendPacket(MSG_UNIMPLEMENTED, struct.pack("!L", self._lastIncomingSeq))

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        # Conch's own logs a two-line "Disconnecting with error" with a bytes
        # repr; here one line in words (the reason's name, the text sent).
        if reason == DISCONNECT_HOST_KEY_NOT_VERIFIABLE and desc.startswith(b"bad host key ["):
            # Conch's client appends the Failure's repr (a traceback) to "bad host
            # key" on the ECDH path: never on the wire. The client logs why.
            desc = b"bad host key"
        self._disconnectSent = True
        self._cancelRekeyTimer()
        self.sendPacket(MSG_DISCONNECT, struct.pack(">L", reason) + NS(desc) + NS(b""))
        self._modernLog.info("{peer}: disconnecting: {why}", peer=peerOf(self),
                             why=disconnect_text(reason, desc), code=reason, description=desc)
        lower: Any = self.transport
        batch = getattr(self, "_batch", None)
        if batch is not None and batch.collecting(lower):
            # Gathered packets (before login, HubServerTransport) go out while the
            # socket is open: disconnectNow aborts it next.
            batch.flush()
        lower.loseConnection()


def messageName(number: int, service: Any) -> str:
    """
    The name of SSH message C{number} (C{CHANNEL_OPEN}), as the transport or
    the running C{service} knows it, else its number.
    """
    if number < 50:
        name = _conch_transport.messages.get(number)
    else:
        name = getattr(service, "protocolMessages", {}).get(number)
    return name[4:] if name else f"message {number}"


def peerOf(ssh: Any) -> str:
    """
    Who is at the other end, for the log: the server's C{peer} or the
    address under the transport.
    """
    peer = getattr(ssh, "peer", None)
    if peer is None and ssh.transport is not None:
        address = ssh.transport.getPeer()
        # An SSH channel's address (a client inside a tunnel) wraps the TCP one.
        address = getattr(address, "address", address)
        peer = getattr(address, "host", address)
    return str(peer)
