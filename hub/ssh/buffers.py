"""
Memory the packet layer reuses from one packet to the next, so that a bulk
transfer costs one copy of each payload and no allocation or system call per
packet: a scratch buffer that grows to the largest packet seen, and padding
cut from random bytes fetched in bulk.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# What the packet layer accepts as data: anything with a byte buffer.
Bytes = bytes | bytearray | memoryview

_PAGE = 1024


class ScratchBuffer:
    """
    A reusable buffer for one packet at a time (one per direction and use).

    L{take} hands out a view of the whole buffer; callers slice it.  A larger
    packet gets a new buffer instead of a resize, so a view still alive
    somewhere never blocks it.  It stays as large as the largest packet so far
    (at most a packet plus a page; about 33 KiB for OpenSSH's 32 KiB channel
    packets).
    """

    def __init__(self) -> None:
        self._view = memoryview(bytearray(0))

    def take(self, size: int) -> memoryview:
        view = self._view
        if len(view) < size:
            view = self._view = memoryview(bytearray((size + _PAGE - 1) // _PAGE * _PAGE))
        return view


class PaddingPool:
    """
    Random padding (RFC 4253 section 6) for one direction of a connection.

    Padding need not be secret, only not predictable plaintext, so it comes
    from C{os.urandom} L{REFILL} bytes at a time, as OpenSSH takes it from its
    user-space arc4random, rather than one C{getrandom} call per packet.  No
    byte is handed out twice.
    """

    REFILL = 1024

    def __init__(self, urandom: Callable[[int], bytes] = os.urandom) -> None:
        self._urandom = urandom
        self._pool = memoryview(b"")
        self._pos = 0

    def take(self, count: int) -> memoryview:
        pos = self._pos
        if pos + count > len(self._pool):
            self._pool = memoryview(self._urandom(max(self.REFILL, count)))
            pos = 0
        self._pos = pos + count
        return self._pool[pos : pos + count]


class ReceiveBuffer:
    """
    Bytes received and not yet taken as packets: C{data[pos:]}, then the
    rest of the last read (C{later}), when there is one.

    While nothing is left over, C{data} is the last read itself (no copy).
    A partial packet left at the end is completed from the next read: when
    the packet layer knows how long that packet is (C{wanted}), only the
    bytes that complete it are copied next to it, and the rest of the read
    is used in place once that packet is taken (L{advance}); otherwise the
    leftover and the whole read are joined into a bytearray.
    """

    def __init__(self, data: Bytes = b"") -> None:
        self.data: Bytes = data
        self.pos = 0
        self.later: tuple[bytes, int] | None = None

    def pending(self) -> int:
        extra = len(self.later[0]) - self.later[1] if self.later else 0
        return len(self.data) - self.pos + extra

    def rest(self) -> bytes:
        head = bytes(memoryview(self.data)[self.pos :])
        if self.later is None:
            return head
        chunk, start = self.later
        return head + chunk[start:]

    def advance(self, used: int) -> None:
        """
        Count C{used} bytes of C{data} as taken.
        """
        self.pos += used
        if self.pos >= len(self.data):
            if self.later is not None:
                (self.data, self.pos), self.later = self.later, None
            else:
                # Drop the read (up to 256 KiB) now, not when the next one comes:
                # an idle connection keeps nothing.
                self.data, self.pos = b"", 0

    def append(self, chunk: bytes, wanted: int = 0) -> None:
        """
        Add a read; C{wanted}: the size of the packet that starts at C{pos},
        if the packet layer knows it (0 if not).
        """
        if self.later is not None:
            self.data, self.pos, self.later = bytearray(self.rest()), 0, None
        data, pos = self.data, self.pos
        left = len(data) - pos
        if left <= 0:
            self.data, self.pos = chunk, 0
            return
        take = wanted - left
        if 0 < take < len(chunk):
            joined = bytearray(wanted)
            joined[:left] = memoryview(data)[pos:]
            joined[left:] = memoryview(chunk)[:take]
            self.data, self.pos, self.later = joined, 0, (chunk, take)
            return
        if type(data) is bytearray:
            try:
                del data[:pos]  # cheap: CPython moves the buffer's start
                self.pos = 0
                data += chunk
                return
            except BufferError:  # a view of it is still alive
                pass
        fresh = bytearray(memoryview(data)[pos:])
        fresh += chunk
        self.data, self.pos = fresh, 0
