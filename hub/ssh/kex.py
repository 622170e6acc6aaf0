"""
Key-exchange rules as plain values: KEXINIT parsing, MAC negotiation for
AEAD ciphers, OpenSSH strict-kex ordering and rekey accounting.

Nothing here does I/O; L{hub.ssh.modern.ModernTransportMixin} feeds
these from the transport.
"""

from __future__ import annotations

import struct

from attrs import define, field, frozen
from twisted.conch.ssh.common import NS, ffs, getNS

from hub.ssh.ciphers import isAEAD

STRICT_KEX_CLIENT = b"kex-strict-c-v00@openssh.com"
STRICT_KEX_SERVER = b"kex-strict-s-v00@openssh.com"
EXT_INFO_CLIENT = b"ext-info-c"
EXT_INFO_SERVER = b"ext-info-s"

# Pseudo-algorithms that only signal features and can never be agreed.
KEX_MARKERS = frozenset(
    {STRICT_KEX_CLIENT, STRICT_KEX_SERVER, EXT_INFO_CLIENT, EXT_INFO_SERVER}
)

MSG_DISCONNECT = 1
MSG_KEXINIT = 20
MSG_NEWKEYS = 21

# Method-specific key exchange messages each side may receive: ECDH,
# curve25519, ML-KEM hybrids and fixed DH groups use 30/31; DH group
# exchange uses 34 (or 30, the old request), 32, 31 and 33.
_KEX_MESSAGES_TO_SERVER = frozenset({30, 32, 34})
_KEX_MESSAGES_TO_CLIENT = frozenset({31, 33})

# OpenSSH rekeys long before a 32-bit sequence number could wrap.
MAX_PACKETS_PER_KEY = 1 << 31


@frozen
class KexInit:
    """
    The name-lists of an SSH_MSG_KEXINIT payload (without its type byte).
    """

    cookie: bytes
    lists: tuple[tuple[bytes, ...], ...]
    tail: bytes

    @property
    def kexAlgorithms(self) -> tuple[bytes, ...]:
        return self.lists[0]

    @property
    def ciphersClientToServer(self) -> tuple[bytes, ...]:
        return self.lists[2]

    @property
    def ciphersServerToClient(self) -> tuple[bytes, ...]:
        return self.lists[3]

    @classmethod
    def parse(cls, payload: bytes) -> KexInit:
        """
        Parse a KEXINIT payload; raises L{ValueError} when it is malformed.
        """
        if len(payload) < 16:
            raise ValueError("KEXINIT too short")
        try:
            *strings, tail = getNS(payload[16:], 10)
        except struct.error as e:
            raise ValueError("KEXINIT malformed") from e
        lists = tuple(tuple(s.split(b",")) if s else () for s in strings)
        return cls(payload[:16], lists, tail)

    def toBytes(self) -> bytes:
        return (
            self.cookie + b"".join(NS(b",".join(names)) for names in self.lists) + self.tail
        )

    def withMACs(
        self, clientToServer: tuple[bytes, ...], serverToClient: tuple[bytes, ...]
    ) -> KexInit:
        lists = list(self.lists)
        lists[4] = clientToServer
        lists[5] = serverToClient
        return KexInit(self.cookie, tuple(lists), self.tail)


def negotiatedCiphers(
    ours: list[bytes], peer: KexInit, isClient: bool
) -> tuple[bytes | None, bytes | None]:
    """
    The ciphers RFC 4253 section 7.1 picks, client-to-server then
    server-to-client: the client's first choice that the server has.
    """
    if isClient:
        return (
            ffs(ours, list(peer.ciphersClientToServer)),
            ffs(ours, list(peer.ciphersServerToClient)),
        )
    return (
        ffs(list(peer.ciphersClientToServer), ours),
        ffs(list(peer.ciphersServerToClient), ours),
    )


def macNeutralPeerKexInit(
    ourCiphers: list[bytes], ourMACs: list[bytes], peer: KexInit, isClient: bool
) -> KexInit:
    """
    The peer's KEXINIT with its MAC list replaced by ours in each direction
    whose agreed cipher is AEAD.  OpenSSH does not negotiate a MAC there,
    but Conch's negotiation fails when the MAC lists do not meet; this
    copy is only handed to Conch's matching code, never hashed.
    """
    cs, sc = negotiatedCiphers(ourCiphers, peer, isClient)
    mac_cs = tuple(ourMACs) if isAEAD(cs) else peer.lists[4]
    mac_sc = tuple(ourMACs) if isAEAD(sc) else peer.lists[5]
    return peer.withMACs(mac_cs, mac_sc)


def strictKexAllows(messageNum: int, isClient: bool, kexInitReceived: bool) -> bool:
    """
    Whether a message may arrive during a strict initial key exchange
    (OpenSSH PROTOCOL, "strict key exchange extension"): the peer's one
    KEXINIT first, then only the key exchange's own messages and NEWKEYS.
    DISCONNECT is always processed; IGNORE, DEBUG, UNIMPLEMENTED and
    everything else end the connection.
    """
    if messageNum == MSG_DISCONNECT:
        return True
    if not kexInitReceived:
        return messageNum == MSG_KEXINIT
    if messageNum == MSG_NEWKEYS:
        return True
    expected = _KEX_MESSAGES_TO_CLIENT if isClient else _KEX_MESSAGES_TO_SERVER
    return messageNum in expected


@define
class RekeyMeter:
    """
    Data and packets protected by the current keys, and whether that is
    enough to ask for new keys (OpenSSH's RekeyLimit data part, plus its
    per-cipher block limit and packet limit).

    @ivar limit: bytes, in either direction, before a rekey is due.
    """

    limit: int
    bytesOut: int = 0
    bytesIn: int = 0
    packetsOut: int = 0
    packetsIn: int = 0
    _maxPackets: int = field(default=MAX_PACKETS_PER_KEY, alias="maxPackets")

    def sent(self, nbytes: int) -> bool:
        """
        Count a packet sent; whether a rekey is due now (L{due}).
        """
        self.bytesOut += nbytes
        self.packetsOut += 1
        return self.due

    def sentMany(self, nbytes: int, packets: int) -> bool:
        """
        Count C{packets} packets of C{nbytes} in all, sent together; whether a
        rekey is due now.
        """
        self.bytesOut += nbytes
        self.packetsOut += packets
        return self.due

    def received(self, nbytes: int) -> None:
        self.bytesIn += nbytes
        self.packetsIn += 1

    @property
    def due(self) -> bool:
        return (
            self.bytesOut >= self.limit
            or self.bytesIn >= self.limit
            or self.packetsOut >= self._maxPackets
            or self.packetsIn >= self._maxPackets
        )

    def restart(self, limit: int) -> None:
        """
        Start counting for new keys good for C{limit} bytes.
        """
        self.limit = limit
        self.bytesOut = self.bytesIn = self.packetsOut = self.packetsIn = 0
