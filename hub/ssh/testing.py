"""
Small SSH peers built on L{hub.ssh.modern}, shipped for tests.

L{makeServerFactory} is a server with one user whose key is given, where
every session runs one of two built-in commands (C{true}, C{cat});
L{ClientPeer} is a client that runs one command and records what comes
back.  Both take their clock as a parameter.
"""

from __future__ import annotations

import struct
from typing import Any

from attrs import define, field
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.transport import SSHClientTransport, SSHServerTransport
from twisted.conch.ssh.userauth import SSHUserAuthClient, SSHUserAuthServer
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from hub.ssh.modern import ModernTransportMixin, ModernUserAuthClientMixin


def newEd25519Key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def newRSAKey(bits: int = 2048) -> keys.Key:
    return keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=bits))


class ModernServerTransport(ModernTransportMixin, SSHServerTransport):
    """
    The composition the hub uses.
    """


class ModernClientTransport(ModernTransportMixin, SSHClientTransport):
    """
    A client transport with the mixin; L{ClientPeer} completes it.
    """


class CommandSession(SSHChannel):
    """
    A server session channel running C{true} or C{cat} (echo until EOF).
    """

    name = b"session"

    def __init__(self, clock: IReactorTime, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._clock = clock
        self.command: bytes | None = None
        self.received = b""

    def request_env(self, data: bytes) -> int:
        return 0

    def request_pty_req(self, data: bytes) -> int:
        return 0

    def request_exec(self, data: bytes) -> int:
        command = getNS(data)[0]
        if command not in (b"true", b"cat"):
            return 0
        self.command = command
        if command == b"true":
            # After the reply to this request has gone out.
            self._clock.callLater(0, self.exit, 0)
        return 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.command == b"cat":
            self.write(data)

    def eofReceived(self) -> None:
        if self.command == b"cat":
            self.exit(0)

    def exit(self, status: int) -> None:
        """Send the exit status, EOF and close."""
        assert self.conn is not None
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", status))
        self.conn.sendEOF(self)
        self.loseConnection()


@implementer(IConchUser)
class CommandUser(ConchUser):
    def __init__(self, clock: IReactorTime, sessions: list[CommandSession]) -> None:
        super().__init__()

        def session(*args: Any, **kw: Any) -> CommandSession:
            channel = CommandSession(clock, *args, **kw)
            sessions.append(channel)
            return channel

        self.channelLookup[b"session"] = session


@implementer(IRealm)
@define
class CommandRealm:
    clock: IReactorTime
    sessions: list[CommandSession] = field(factory=list)

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        return IConchUser, CommandUser(self.clock, self.sessions), lambda: None


class _Factory(SSHFactory):
    pass


def makeServerFactory(
    hostKey: keys.Key,
    user: bytes,
    userKey: keys.Key,
    clock: IReactorTime,
    transport: type[SSHServerTransport] = ModernServerTransport,
) -> SSHFactory:
    """
    An L{SSHFactory} for one user; the realm is C{factory.realm}, and each
    transport it builds gets C{clock}.
    """
    realm = CommandRealm(clock)

    class UserAuth(SSHUserAuthServer):
        pass

    UserAuth.clock = clock
    UserAuth.loginTimeout = 120

    class Transport(transport):  # type: ignore[valid-type,misc]
        pass

    Transport.clock = clock
    factory = _Factory()
    factory.protocol = Transport
    factory.publicKeys = {hostKey.sshType(): hostKey.public()}
    factory.privateKeys = {hostKey.sshType(): hostKey}
    factory.primes = None
    factory.services = {**SSHFactory.services, b"ssh-userauth": UserAuth}
    factory.portal = Portal(  # type: ignore[attr-defined]
        realm, [SSHPublicKeyChecker(InMemorySSHKeyDB({user: [userKey.public()]}))]
    )
    factory.realm = realm  # type: ignore[attr-defined]
    return factory


class CommandChannel(SSHChannel):
    """
    A client session channel that runs one command, sends C{stdin}, and
    records output and exit status; C{done} fires at close.
    """

    name = b"session"

    def __init__(self, command: bytes, stdin: bytes, **kw: Any) -> None:
        super().__init__(**kw)
        self.command = command
        self.stdin = stdin
        self.output = b""
        self.status: int | None = None
        self.opened = False
        self.done: defer.Deferred[CommandChannel] = defer.Deferred()

    def channelOpen(self, specificData: bytes) -> None:
        self.opened = True
        assert self.conn is not None
        self.conn.sendRequest(self, b"exec", NS(self.command))
        if self.stdin:
            self.write(self.stdin)
            self.conn.sendEOF(self)

    def dataReceived(self, data: bytes) -> None:
        self.output += data

    def request_exit_status(self, data: bytes) -> int:
        (self.status,) = struct.unpack(">L", data[:4])
        return 1

    def closed(self) -> None:
        self.loseConnection()
        if not self.done.called:
            self.done.callback(self)


class _Connection(SSHConnection):
    def __init__(self, peer: ClientPeer) -> None:
        super().__init__()
        self._peer = peer

    def serviceStarted(self) -> None:
        super().serviceStarted()
        channel = CommandChannel(self._peer.command, self._peer.stdin, conn=self)
        self._peer.channel = channel
        self.openChannel(channel)


class _UserAuth(ModernUserAuthClientMixin, SSHUserAuthClient):
    def __init__(self, user: bytes, key: keys.Key, connection: SSHConnection) -> None:
        super().__init__(user, connection)
        self._privateKey = key
        self._untried: keys.Key | None = key

    def getPublicKey(self) -> keys.Key | None:
        key, self._untried = self._untried, None
        return key.public() if key else None

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        return defer.succeed(self._privateKey)


@define(eq=False)
class ClientPeer:
    """
    What a test client does: authenticate as C{user} with C{userKey},
    accept only C{hostKey}, and run C{command}.
    """

    user: bytes
    userKey: keys.Key
    hostKey: keys.Key
    command: bytes = b"true"
    stdin: bytes = b""
    channel: CommandChannel | None = None
    authenticated: bool = False

    def buildProtocol(self, clock: IReactorTime | None = None) -> ModernClientTransport:
        peer = self

        class Transport(ModernClientTransport):
            def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Any:
                if hostKey == peer.hostKey.public().blob():
                    return defer.succeed(True)
                return defer.fail(ValueError("unexpected host key"))

            def connectionSecure(self) -> None:
                self.requestService(_UserAuth(peer.user, peer.userKey, _Connection(peer)))

        transport = Transport()
        if clock is not None:
            transport.clock = clock
        return transport
