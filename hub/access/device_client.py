"""The hub as an SSH client to its devices, through their tunnels (no TCP hop).

The client runs in-process over a `forwarded-tcpip` channel to the node's
`ssh` forward. It logs in as the node's device user with the hub's management
key (ed25519) or a short-lived certificate for it from the hub's user CA
(`hub.ssh.usercerts`), or once with a password at enrollment to install that key, and
checks the device host key pinned at enrollment.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import channel, common, connection, keys, transport, userauth
from twisted.conch.ssh.connection import OPEN_CONNECT_FAILED
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.errors import HubError
from hub.ssh.algorithms import CLIENT_CIPHERS
from hub.ssh.connection import ChannelRefused, WindowedChannelsMixin
from hub.ssh.disconnect import disconnect_text, log_peer_disconnect, open_failure_of
from hub.ssh.iogroup import IOGroup
from hub.ssh.keys import fingerprint
from hub.ssh.modern import ModernTransportMixin, ModernUserAuthClientMixin
from hub.ssh.usercerts import DeviceIdentity, UserCertificate
from hub.tunnel.dial import DeviceRefused, OpenNotice
from hub.tunnel.inprocess import ProtocolChannel
from hub.tunnel.live import NodeTunnel

log = Logger()

LOGIN_TIMEOUT = 30.0
# An SSH server sends its version line at once; a forward that says nothing (a web
# server waits for a request) or something else is not one, and is told so early.
VERSION_TIMEOUT = 10.0


class DeviceError(HubError):
    """The device could not be reached or refused the hub; the message says why."""


class HostKeyMismatch(DeviceError):
    """The device presented a host key other than the one pinned at enrollment."""


class KeyRefused(DeviceError):
    """The device refused the hub's management key (it has not authorized it)."""


class PasswordRefused(DeviceError):
    """The device refused the password given at enrollment."""


class ServiceRefused(DeviceError):
    """The device could not connect the tunnel channel to its SSH service."""


# The methods that carry the enrollment password.
PASSWORD_METHODS = (b"password", b"keyboard-interactive")


class DeviceConnection(WindowedChannelsMixin, connection.SSHConnection):
    def __init__(self, ready: defer.Deferred[DeviceConnection]) -> None:
        connection.SSHConnection.__init__(self)
        self.ready = ready

    def serviceStarted(self) -> None:
        connection.SSHConnection.serviceStarted(self)
        if not self.ready.called:
            self.ready.callback(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class DeviceUserAuth(ModernUserAuthClientMixin, userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, key: keys.Key, password: bytes | None,
                 conn: DeviceConnection,
                 offers: list[keys.Key | UserCertificate] | None = None) -> None:
        userauth.SSHUserAuthClient.__init__(self, user, conn)
        # Each offered once, in order: a certificate first when there is one.
        self._offers = [key.public()] if offers is None else list(offers)
        self._private = key
        self._password = password

    transport: Any

    def getPublicKey(self) -> Any:
        if not self._offers:
            return None
        offer = self._offers.pop(0)
        if isinstance(offer, UserCertificate):
            self.transport.certificate = offer
        return offer

    def ssh_USERAUTH_SUCCESS(self, packet: bytes) -> None:
        self.transport.logged_in_with = self.lastAuth
        self.transport.by_certificate = (self.lastAuth == b"publickey" and isinstance(
            self.lastPublicKey, UserCertificate))
        userauth.SSHUserAuthClient.ssh_USERAUTH_SUCCESS(self, packet)

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        # What the device said no to, so a failed login can say which credential.
        if self.lastAuth != b"none":
            self.transport.refused_methods.add(self.lastAuth)
        return userauth.SSHUserAuthClient.ssh_USERAUTH_FAILURE(self, packet)

    def getPrivateKey(self) -> defer.Deferred[keys.Key]:
        return defer.succeed(self._private)

    def getPassword(self, prompt: Any = None) -> Any:
        password, self._password = self._password, None
        if password is None:
            return None
        self.transport.password_sent = True
        return defer.succeed(password)

    def getGenericAnswers(self, name: Any, instruction: Any, questions: Any) -> Any:
        # keyboard-interactive: answer a single password question at enrollment.
        password, self._password = self._password, None
        if password is None or len(questions) != 1:
            return defer.fail(DeviceError("no answer for keyboard-interactive"))
        self.transport.password_sent = True
        return defer.succeed([password])


class DeviceClientTransport(ModernTransportMixin, transport.SSHClientTransport):
    peer: str  # who the device is, for the log; while unset, its address is used
    # The hub's own sessions (to devices, NETCONF, peer hubs) choose their cipher.
    supportedCiphers = list(CLIENT_CIPHERS)

    def __init__(self, user: bytes, key: keys.Key, password: bytes | None,
                 pinned: bytes | None, ready: defer.Deferred[DeviceConnection],
                 clock: Any, io_group: IOGroup | None = None,
                 offers: list[keys.Key | UserCertificate] | None = None) -> None:
        self.user = user
        self.key = key
        self.offers = offers
        # The certificate offered, if one was: a refusal names it.
        self.certificate: UserCertificate | None = None
        self.password = password
        self.pinned = pinned
        self.ready = ready
        self.clock = clock
        # Inside a tunnel, the group of the hub transport it runs in: its
        # input ends with the read that carried it (see hub.ssh.iogroup).
        self.ioGroup = io_group
        self.host_key: bytes | None = None
        self.failure: DeviceError | None = None
        # The user-auth method the device accepted (b"publickey": the management
        # key was authorized already), the methods it refused, and whether the
        # enrollment password was sent at all.
        self.logged_in_with: bytes | None = None
        self.refused_methods: set[bytes] = set()
        self.password_sent = False
        self.by_certificate = False  # logged in with the certificate, not the plain key
        # What came before the version line (RFC 4253 lets a server send lines
        # first; a service that is not SSH sends only those), or None once it came.
        self.before_version: bytes | None = b""

    def _dataReceived(self, data: bytes) -> None:
        # Conch would parse whatever a service that is not SSH says as packets
        # and report a closed connection: the version line is looked for here.
        if self.before_version is None:
            super()._dataReceived(data)
            return
        self.before_version += data
        start = version_line(self.before_version)
        if start is None:
            if len(self.before_version) > MAX_BEFORE_VERSION:
                self.failure = DeviceError(not_ssh(self.said(), ""))
                if self.transport is not None:
                    self.transport.loseConnection()
            return
        rest, self.before_version = self.before_version[start:], None
        super()._dataReceived(rest)

    def said(self) -> str:
        """The first line the device's service sent before any version line."""
        line = (self.before_version or b"").split(b"\n", 1)[0][:80]
        return line.decode("utf-8", "replace").strip()

    def verifyHostKey(self, hostKey: bytes, fingerprint_: bytes) -> defer.Deferred[bool]:
        self.host_key = hostKey
        if self.pinned is not None and hostKey != self.pinned:
            self.failure = HostKeyMismatch(
                f"device host key changed: pinned {fingerprint(self.pinned)}, "
                f"now {fingerprint(hostKey)}; re-enroll the node if this is expected")
            return defer.fail(self.failure)
        return defer.succeed(True)

    def connection_service(self) -> DeviceConnection:
        """The ssh-connection service to start once logged in (subclasses add to it)."""
        return DeviceConnection(self.ready)

    def connectionSecure(self) -> None:
        self.requestService(DeviceUserAuth(self.user, self.key, self.password,
                                           self.connection_service(), self.offers))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if self.failure is None:
            self.failure = self.login_refused(disconnect_text(reasonCode, description))
        log_peer_disconnect(log, "the device", reasonCode, description)

    def login_refused(self, said: str | None = None) -> DeviceError:
        """Why the login failed, from what the device refused: the password
        (enrollment), else the management key, else the device's own words."""
        user = self.user.decode("utf-8", "replace")
        if self.password_sent and self.refused_methods & set(PASSWORD_METHODS):
            return PasswordRefused(f"the device refused the password for {user}")
        if b"publickey" in self.refused_methods:
            offered = "" if self.password is None or self.password_sent else (
                " and offers no password login")
            if self.certificate is not None:
                also = " and management key" if any(
                    isinstance(o, keys.Key) for o in self.offers or ()) else ""
                return KeyRefused(
                    f"the device refused the hub's certificate (key ID "
                    f"{self.certificate.key_id}, principal {user}, signed by the hub user "
                    f"CA){also} for {user}{offered}: does its sshd trust the hub CA "
                    "(callhomehub ca pubkey) for that user?")
            return KeyRefused(f"the device refused the hub's management key for {user}"
                              f"{offered}")
        if said is not None:
            return DeviceError(said)
        return DeviceError("the device closed the connection during login (management key "
                           "not authorized, or wrong password?)")

    def connectionLost(self, reason: Any = None) -> None:
        transport.SSHClientTransport.connectionLost(self, reason)
        if self.failure is None and self.before_version is not None:
            # Gone before any version line: not a refused login (a web server
            # answers the hub's version line with an error page and closes).
            said = self.said()
            self.failure = DeviceError(
                not_ssh(said, "") if said else
                "the device's ssh forward closed the connection before sending an SSH "
                "version line")
        if not self.ready.called:
            self.ready.errback(self.failure or self.login_refused())


class ClientChannel(OpenNotice, ProtocolChannel):
    """Runs the device client protocol over a forwarded-tcpip channel."""

    def __init__(self, protocol: DeviceClientTransport, **kw: Any) -> None:
        ProtocolChannel.__init__(self, localWindow=2 * 1024 * 1024, localMaxPacket=32768, **kw)
        self.name = b"forwarded-tcpip"
        self.protocol = protocol

    def channelOpen(self, specificData: bytes) -> None:
        ProtocolChannel.channelOpen(self, specificData)
        self.notify_open()

    def openFailed(self, reason: Any) -> None:
        self.notify_failed(reason)  # `connect` tells the client why


def connect(tunnel: NodeTunnel, user: str, key: keys.Key | DeviceIdentity,
            pinned: bytes | None, password: bytes | None = None, clock: Any = None,
            ) -> tuple[defer.Deferred[DeviceConnection], DeviceClientTransport]:
    """Log in to the device behind `tunnel` over its `ssh` forward, with the
    management key or (a `DeviceIdentity` with a CA) a certificate for it."""
    identity = key if isinstance(key, DeviceIdentity) else DeviceIdentity(key)
    ready: defer.Deferred[DeviceConnection] = defer.Deferred()
    client = DeviceClientTransport(user.encode(), identity.key, password, pinned, ready,
                                   clock, tunnel.io_group,
                                   identity.offers(user, tunnel.node))
    client.peer = f"node {tunnel.node}"

    def refused(f: Failure) -> Failure | None:
        why = f.value
        if isinstance(why, DeviceRefused):
            client.failure = tunnel_refused(tunnel, why)
            client.connectionLost(None)
        elif isinstance(why, ChannelRefused):  # the node does not forward ssh
            ready.errback(DeviceError(why.text))
        else:
            return f
        return None

    tunnel.dial("ssh", ClientChannel(client)).addErrback(refused)
    if clock is not None and not ready.called:
        ready.addTimeout(LOGIN_TIMEOUT, clock, onTimeoutCancel=_login_too_slow)

        def no_version() -> None:
            if ready.called or client.before_version is None:
                return
            ready.errback(DeviceError(not_ssh(client.said(), f" within {VERSION_TIMEOUT:g} s")))
            if client.transport is not None:
                client.transport.loseConnection()

        check = clock.callLater(VERSION_TIMEOUT, no_version)

        def settled(result: object) -> object:
            if check.active():
                check.cancel()
            return result

        ready.addBoth(settled)
    return ready, client


def tunnel_refused(tunnel: NodeTunnel, why: DeviceRefused) -> DeviceError:
    """The device refused the hub's channel to its `ssh` forward. With `connect
    failed` its SSH service did not take the connection (sshd down, or the
    forward names the wrong port). The hub never learns the device-side target
    of `ssh -R` (the protocol does not carry it): the message names the forward
    as the device asked for it."""
    if why.code != OPEN_CONNECT_FAILED:
        return DeviceError(f"the device refused the tunnel channel: {why.words}")
    forward = tunnel.table.lookup("ssh")
    named = "" if forward is None else (
        f" behind its forward {forward.bind.decode('utf-8', 'replace') or '*'}"
        f":{forward.requested}")
    return ServiceRefused(f"the device's SSH service{named} refused the connection: "
                          f"{why.words}")


MAX_BEFORE_VERSION = 4096


def version_line(received: bytes) -> int | None:
    """Where the SSH version line starts in what a server sent, once it is whole."""
    at = 0
    while True:
        end = received.find(b"\n", at)
        if end < 0:
            return None
        if received.startswith(b"SSH-", at):
            return at
        at = end + 1


def not_ssh(said: str, within: str) -> str:
    return (f"the device's ssh forward did not answer as an SSH server{within} "
            f"({f'it said {said!r}' if said else 'it sent nothing'}); is the forward "
            "pointing at another service?")


def _login_too_slow(result: object, timeout: float) -> Failure:
    return Failure(DeviceError(f"the device did not complete the login within {timeout:g} s"))


class CommandChannel(channel.SSHChannel):
    """Runs one command on the device and collects its output and exit status."""

    name = b"session"
    conn: Any

    def __init__(self, command: bytes, done: defer.Deferred[tuple[int, bytes, bytes]]) -> None:
        channel.SSHChannel.__init__(self)
        self.command = command
        self.done = done
        self.out = bytearray()
        self.err = bytearray()
        self.status = 255

    def channelOpen(self, specificData: bytes) -> None:
        self.conn.sendRequest(self, b"exec", common.NS(self.command), wantReply=1
                              ).addErrback(lambda f: self.loseConnection())

    def openFailed(self, reason: Any) -> None:
        self.done.errback(DeviceError(
            f"the device refused a session: {open_failure_of(reason)[1]}"))

    def dataReceived(self, data: bytes) -> None:
        self.out += data[:65536 - len(self.out)]

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.err += data[:65536 - len(self.err)]

    def request_exit_status(self, data: bytes) -> int:
        (self.status,) = struct.unpack(">L", data[:4])
        return 1

    def eofReceived(self) -> None:
        self.loseConnection()

    def closed(self) -> None:
        if not self.done.called:
            self.done.callback((self.status, bytes(self.out), bytes(self.err)))


def run_command(conn: DeviceConnection, command: bytes) -> defer.Deferred[tuple[int, bytes, bytes]]:
    done: defer.Deferred[tuple[int, bytes, bytes]] = defer.Deferred()
    conn.openChannel(CommandChannel(command, done))
    return done
