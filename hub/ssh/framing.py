"""
What every way of protecting SSH packets shares: framing and padding
(RFC 4253 section 6), length checks, the HMAC of the MAC-based modes, the
errors, and L{Framed}, the base of the modes that frame into their own
buffers (see L{hub.ssh.packet}).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from hub.ssh.buffers import Bytes, PaddingPool, ScratchBuffer

# RFC 4253 section 11.1 reason codes used here.
DISCONNECT_PROTOCOL_ERROR = 2
DISCONNECT_MAC_ERROR = 5

# Conch's limit on packet_length (OpenSSH uses 256 KiB).
MAX_PACKET_LENGTH = 1024 * 1024

_UINT32 = struct.Struct("!L")


class PacketError(Exception):
    """
    A received packet is malformed or fails authentication; the connection
    must be dropped with C{reason} (an SSH disconnect reason code).
    """

    def __init__(self, reason: int, description: bytes) -> None:
        super().__init__(reason, description)
        self.reason = reason
        self.description = description


class PacketProtection(Protocol):
    """
    How packets are framed and protected in one direction.

    @ivar blockSize: the padding block size (at least 8).
    @ivar name: the cipher name, for logs.
    @ivar wanted: after L{openFrom} found a packet incomplete, its whole
        size on the wire if known (0 if not): the receive buffer then
        copies only what completes it from the next read.
    """

    blockSize: int
    name: bytes
    wanted: int

    def seal(self, seqnr: int, payload: bytes) -> bytes:
        """
        Frame, pad and protect C{payload} as packet number C{seqnr}.
        """

    def sealInto(
        self, seqnr: int, head: bytes, data: Bytes, out: memoryview | None = None
    ) -> memoryview:
        """
        L{seal} the payload C{head + data} without joining the two; the wire
        bytes, valid until the next call.
        """

    def open(self, seqnr: int, buf: Bytes) -> tuple[bytes, int] | None:
        """
        Take the packet numbered C{seqnr} from the front of C{buf}.
        """

    def openFrom(self, seqnr: int, buf: Bytes, pos: int) -> tuple[memoryview, int] | None:
        """
        L{open} the packet at C{buf[pos:]}; the payload, valid until the
        next call, and the bytes used.
        """


def padLength(blockSize: int, payloadLength: int, lengthInClear: bool) -> int:
    """
    Padding for a payload, as OpenSSH computes it: the padded part must be a
    multiple of the block size, and the 4-byte length field does not count
    when it is kept out of the encrypted stream (EtM, GCM, ChaCha20).
    """
    size = 5 + payloadLength - (4 if lengthInClear else 0)
    pad = blockSize - size % blockSize
    if pad < 4:
        pad += blockSize
    return pad


def frameInto(
    out: memoryview, head: bytes, data: Bytes, pad: int, padding: PaddingPool
) -> int:
    """
    Write C{padding_length || head || data || random padding}, the part of
    the packet after the length field, at the start of C{out}; its length.
    """
    out[0] = pad
    start = 1 + len(head)
    out[1:start] = head
    end = start + len(data)
    out[start:end] = data
    out[end : end + pad] = padding.take(pad)
    return end + pad


def unframeBody(body: memoryview) -> memoryview:
    """
    The payload from C{padding_length || payload || padding}.
    """
    pad = body[0]
    if pad < 4 or pad + 1 >= len(body):
        raise PacketError(DISCONNECT_PROTOCOL_ERROR, b"bad padding length")
    return body[1 : len(body) - pad]


def checkLength(packet_length: int, blockSize: int, lengthInClear: bool) -> None:
    """
    Refuse a packet_length that is out of range or not block-aligned.
    """
    if packet_length < 5 or packet_length > MAX_PACKET_LENGTH:
        raise PacketError(
            DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % (packet_length,)
        )
    aligned = packet_length if lengthInClear else packet_length + 4
    if aligned % blockSize:
        raise PacketError(
            DISCONNECT_PROTOCOL_ERROR, b"bad packet mod (%d)" % (packet_length,)
        )


# hashlib's names (C{digestmod().name}) for the hashes of SSH's MACs.
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class HMACAlgorithm:
    """
    An SSH C{hmac-*} MAC: HMAC over C{uint32 seqnr || data}.  The keyed
    state is computed once and copied per packet.

    cryptography's HMAC, not hashlib's: its copy is cheaper (OpenSSL 3's
    C{HMAC_CTX_copy} under hashlib allocates and wipes a context and a lock
    per packet), it checks a tag in constant time itself, and it keeps the
    GIL, where hashlib lets it go for every update over 2 KiB and may have
    to wait for it back behind another thread of the hub.
    """

    def __init__(self, digestmod: Callable[..., Any], key: bytes) -> None:
        digest = digestmod()
        self.size: int = digest.digest_size
        # The hash's name and the key, for hub.ssh._packets.EtM.
        self.digestName: str = digest.name
        # SSH uses exactly digest-size keys (RFC 4253 section 7.2).
        self.key = key[: self.size]
        self._keyed = HMAC(self.key, _HASHES[digest.name]())

    def mac(self, seqnr: int, data: Bytes) -> bytes:
        h = self._keyed.copy()
        h.update(_UINT32.pack(seqnr))
        h.update(data)
        return h.finalize()

    def verify(self, seqnr: int, data: Bytes, tag: Bytes) -> bool:
        h = self._keyed.copy()
        h.update(_UINT32.pack(seqnr))
        h.update(data)
        try:
            h.verify(bytes(tag))
        except InvalidSignature:
            return False
        return True


class Framed:
    """
    L{seal} and L{open} in terms of L{sealInto} and L{openFrom}, and the
    buffers they use.

    @ivar _c: the object of C{hub.ssh._packets} that seals and opens the
        packets, if it does (its C{open_into} is what L{_openWithC} calls).
    """

    wanted = 0
    _c: Any = None
    # The receive scratch buffer of an idle connection: a page.  It grows to
    # the largest packet received.
    SCRATCH_START = 1024

    def __init__(self) -> None:
        self._padding = PaddingPool()
        self._plain = ScratchBuffer()
        self._wire = ScratchBuffer()

    def sealInto(
        self, seqnr: int, head: bytes, data: Bytes, out: memoryview | None = None
    ) -> memoryview:
        raise NotImplementedError

    def openFrom(self, seqnr: int, buf: Bytes, pos: int) -> tuple[memoryview, int] | None:
        raise NotImplementedError

    def _openWithC(
        self, seqnr: int, buf: Bytes, pos: int, tagSize: int
    ) -> tuple[memoryview, int] | None:
        """
        L{openFrom} by C{self._c}, for a packet whose length is in clear (or
        decrypted by C{self._c}) and whose tag is C{tagSize} bytes: into the
        scratch buffer as it is, grown and tried again for a whole packet
        larger than it (the length is read again: 0.1 us).
        """
        c = self._c
        plain = self._plain.take(self.SCRATCH_START)
        got = c.open_into(seqnr, buf, pos, plain)
        if got is not None and got < 0:  # -1 - packet_length: check it, then wait or grow
            packet_length = -1 - got
            checkLength(packet_length, self.blockSize, True)  # type: ignore[attr-defined]
            need = 4 + packet_length + tagSize
            if len(buf) - pos < need:
                self.wanted = need
                return None
            plain = self._plain.take(packet_length)
            got = c.open_into(seqnr, buf, pos, plain)
        if got is None:
            raise PacketError(DISCONNECT_MAC_ERROR, b"bad MAC")
        if not got:
            return None  # not even the length yet
        self.wanted = 0
        return unframeBody(plain[:got]), 4 + got + tagSize

    def sealDataInto(
        self, seqnr: int, recipient: int, data: Bytes, maxPacket: int, out: memoryview
    ) -> tuple[int, int] | None:
        """
        All of C{data} as CHANNEL_DATA packets to channel C{recipient}, at most
        C{maxPacket} bytes of it each, sealed one after another into C{out}
        by C{self._c} (packets C{seqnr}, C{seqnr + 1}, ...): how many packets,
        and how many bytes of C{out}; L{None} if this protection has no C
        object (the caller then sends packet by packet).
        """
        c = self._c
        if c is None:
            return None
        count = -(-len(data) // maxPacket)
        padding = self._padding.take(count * (self.blockSize + 3))  # type: ignore[attr-defined]
        result: tuple[int, int] = c.seal_data_into(seqnr, recipient, data, maxPacket,
                                                   padding, out)
        return result

    def seal(self, seqnr: int, payload: bytes) -> bytes:
        return self.sealInto(seqnr, b"", payload).tobytes()

    def open(self, seqnr: int, buf: Bytes) -> tuple[bytes, int] | None:
        opened = self.openFrom(seqnr, buf, 0)
        if opened is None:
            return None
        return opened[0].tobytes(), opened[1]
