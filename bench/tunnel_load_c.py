"""`tunnel_load.py` with libssh2 (ssh2-python) as the devices' SSH client: the cheap generator.

    .venv/bin/python bench/tunnel_load_c.py --port P --keys FILE [same options]

The same devices, commands, reports and storm behaviour as `tunnel_load.py`
(whose fleet code this runs), but each handshake is libssh2's C code driven
non-blocking from the one asyncio loop: asyncssh spends 3.6-4 ms of CPU per
handshake in Python, as much as the hub, so on a 2-core machine the reconnect
storm measured the generator as much as the hub. Negotiates what OpenSSH 9.2
picks with the hub (curve25519-sha256, ssh-ed25519, chacha20-poly1305) unless
--asyncssh-defaults (then libssh2's own order). Forwards lead nowhere: --service
is not supported (a connection through the hub's port would be refused).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN
from ssh2.exceptions import SSH2Error
from ssh2.listener import Listener
from ssh2.session import (
    LIBSSH2_METHOD_CRYPT_CS,
    LIBSSH2_METHOD_CRYPT_SC,
    LIBSSH2_METHOD_HOSTKEY,
    LIBSSH2_METHOD_KEX,
    LIBSSH2_SESSION_BLOCK_INBOUND,
    LIBSSH2_SESSION_BLOCK_OUTBOUND,
    Session,
)
from tunnel_load import DEVICE_SERVICE, Connection, main

LIKE_OPENSSH = {LIBSSH2_METHOD_KEX: "curve25519-sha256,curve25519-sha256@libssh.org",
                LIBSSH2_METHOD_HOSTKEY: "ssh-ed25519,ecdsa-sha2-nistp256",
                LIBSSH2_METHOD_CRYPT_CS: "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com",
                LIBSSH2_METHOD_CRYPT_SC: "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com"}


def would_block(result: Any) -> bool:
    """ssh2-python's EAGAIN: the code itself, or (code, 0) from forward_listen_ex."""
    if isinstance(result, tuple):
        result = result[0]
    return isinstance(result, int) and result == LIBSSH2_ERROR_EAGAIN


class Libssh2Connection:
    """One device's non-blocking libssh2 session over its own socket, on the asyncio loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session: Session | None = Session()
        self.listener: Listener | None = None
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        # The socket stays in the loop's reader set from one wait to the next (an
        # epoll_ctl pair per wait was a third of the generator's CPU per handshake).
        self._reading = False

    async def call(self, method: Any, *args: Any) -> Any:
        """`method(*args)` again each time the socket is ready, until it does not say EAGAIN."""
        while True:
            result = method(*args)
            if not would_block(result):
                return result
            await self._ready()

    async def _ready(self) -> None:
        """Wait for the direction(s) libssh2 is blocked on."""
        assert self.session is not None
        directions = self.session.block_directions() or LIBSSH2_SESSION_BLOCK_INBOUND
        self._waiter = self._loop.create_future()
        fd = self.sock.fileno()
        if directions & LIBSSH2_SESSION_BLOCK_INBOUND and not self._reading:
            self._loop.add_reader(fd, self._readable)
            self._reading = True
        if directions & LIBSSH2_SESSION_BLOCK_OUTBOUND:
            self._loop.add_writer(fd, self._writable)
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _readable(self) -> None:
        if self._waiter is None:
            # Bytes came while libssh2 was not waiting for them: stop watching (the
            # loop would call again and again) until the next wait.
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        elif not self._waiter.done():
            self._waiter.set_result(None)

    def _writable(self) -> None:
        self._loop.remove_writer(self.sock.fileno())
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_closed(self) -> None:
        """Read (and so answer the hub's keepalives) until the connection is gone.

        libssh2 reads and handles every pending packet in `forward_accept`; it
        answers a global request such as keepalive@openssh.com with
        REQUEST_FAILURE, as OpenSSH's client does."""
        while self.listener is not None:
            try:
                result = self.listener.forward_accept()
            except SSH2Error:
                return      # the socket closed or a disconnect came
            if not would_block(result):
                return      # a channel through the forward: none is expected
            await self._ready()

    def abort(self) -> None:
        """Drop the connection without a word to the hub.

        The socket is shut down first: freeing libssh2's listener sends
        cancel-tcpip-forward, which must fail here rather than reach the hub (or a
        later socket that reuses this descriptor)."""
        if self.session is None:
            return
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass                     # never connected, or already reset
        self.listener = None
        self.session = None
        self.sock.close()


class Libssh2Client:
    """libssh2 1.11 (ssh2-python's wheel): kex, signatures and ciphers in C (OpenSSL)."""

    errors = (TimeoutError, OSError, SSH2Error)

    def load_key(self, text: str) -> bytes:
        return text.encode()

    async def connect(self, args: argparse.Namespace, key: bytes) -> tuple[Connection, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = Libssh2Connection(sock)
        try:
            async with asyncio.timeout(args.timeout):
                port = await self._login(conn, args, key)
        except BaseException:
            conn.abort()
            raise
        return conn, port

    async def _login(self, conn: Libssh2Connection, args: argparse.Namespace, key: bytes
                     ) -> int:
        session = conn.session
        assert session is not None
        session.set_blocking(False)
        if args.like_openssh:
            for method, preference in LIKE_OPENSSH.items():
                session.method_pref(method, preference)
        await asyncio.get_running_loop().sock_connect(conn.sock, (args.host, args.port))
        await conn.call(session.handshake, conn.sock)
        await conn.call(session.userauth_publickey_frommemory, args.user, key)
        # "" is what `ssh -R 0:...` sends; None would make libssh2 send 0.0.0.0.
        conn.listener, port = await conn.call(session.forward_listen_ex, 16, "", 0)
        return int(port)


def refuse_service(argv: list[str]) -> None:
    if any(a == "--service" or a.startswith("--service=") for a in argv):
        sys.exit(f"tunnel_load_c.py: --service is not supported (forwards lead to "
                 f"{DEVICE_SERVICE[0]}:{DEVICE_SERVICE[1]}, never used); use tunnel_load.py")


if __name__ == "__main__":
    refuse_service(sys.argv[1:])
    sys.exit(main(client=Libssh2Client()))
