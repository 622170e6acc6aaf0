"""The console gateway in memory: operator (Conch client) <-> hub <-> a device's tunnel.

The device calls home with an `ssh` forward; each `forwarded-tcpip` channel
the hub opens to it runs an in-memory SSH server (the device's sshd) that
authorizes the hub's management key and whose host key the hub pinned at
enrollment. Every connection is an iosim pump on one MemoryReactorClock.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from memory_hub import (
    ClientAuth,
    ClientConnection,
    ClientTransport,
    make_hub,
    new_key,
    start_factory,
)
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.error import ConchError
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import channel, common, keys
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from hub.access.server import HubSSHFactory
from hub.app.context import Hub
from hub.ssh.testing import CommandSession, makeServerFactory
from hub.tunnel.inprocess import ProtocolChannel

DEVICE_USERS = (b"root", b"root:port02")


# -- the device's sshd ---------------------------------------------------------

class DeviceShell(CommandSession):
    """A device session. exec commands: `hello` (stdout, stderr, exit 3), `cat` (echo
    until EOF), `bulk N` (N bytes), `refuse` (the request is refused), anything else
    is echoed back as `ran <command> as <user>`. A shell prompts `<user># ` and runs
    each line the same way; `exit` ends it."""

    name = b"session"

    def __init__(self, device: DeviceSSHD, user: bytes, **kw: Any) -> None:
        CommandSession.__init__(self, device.clock, **kw)
        self.device = device
        self.user = user
        self.pty: bytes | None = None
        self.window_changes: list[bytes] = []
        self.line = b""
        device.sessions.append(self)

    def request_pty_req(self, data: bytes) -> int:
        self.pty = data
        return 1

    def request_window_change(self, data: bytes) -> int:
        self.window_changes.append(data)
        return 1

    def request_exec(self, data: bytes) -> int:
        command = common.getNS(data)[0]
        if command == b"refuse":
            return 0
        self.command = command
        # After the reply to this request has gone out.
        self.device.clock.callLater(0, self._run, command)
        return 1

    def request_shell(self, data: bytes) -> int:
        self.command = b"shell"
        self.device.clock.callLater(0, self.write, self.user + b"# ")
        return 1

    def _run(self, command: bytes) -> None:
        if command == b"hello":
            self.write(b"hello from " + self.user + b"\n")
            self.writeExtended(1, b"err\n")
            self.exit(3)
        elif command.startswith(b"bulk "):
            self.write(bytes(range(256)) * (int(command.split()[1]) // 256))
            self.exit(0)
        elif command != b"cat":
            self.write(b"ran " + command + b" as " + self.user + b"\n")
            self.exit(0)

    def dataReceived(self, data: bytes) -> None:
        CommandSession.dataReceived(self, data)  # keeps it; echoes it for `cat`
        if self.command == b"shell":
            self.line += data
            while b"\r" in self.line:
                line, self.line = self.line.split(b"\r", 1)
                if line == b"exit":
                    self.exit(0)
                    return
                self.write(line + b"\r\nran " + line + b"\r\n" + self.user + b"# ")


@implementer(IRealm)
class DeviceRealm:
    def __init__(self, device: DeviceSSHD) -> None:
        self.device = device

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        self.device.logins.append(avatarId)
        user = ConchUser()
        user.channelLookup[b"session"] = lambda *a, **kw: DeviceShell(self.device, avatarId,
                                                                      *a, **kw)
        return IConchUser, user, lambda: None


class DeviceSSHD:
    """The device's sshd: the hub's management key may log in as any of DEVICE_USERS."""

    def __init__(self, clock: MemoryReactorClock, mgmt: keys.Key) -> None:
        self.clock = clock
        self.host_key = new_key()
        self.factory = makeServerFactory(self.host_key, b"root", mgmt, clock)
        self.factory.portal = Portal(DeviceRealm(self), [SSHPublicKeyChecker(  # type: ignore[attr-defined]
            InMemorySSHKeyDB({user: [mgmt.public()] for user in DEVICE_USERS}))])
        self.factory.startFactory()
        self.logins: list[bytes] = []
        self.sessions: list[DeviceShell] = []
        self.refuse_channels = False


# -- the device's call-home tunnel ---------------------------------------------

class SSHDChannel(ProtocolChannel):
    """A forwarded-tcpip channel from the hub, carried to the device's sshd."""

    name = b"forwarded-tcpip"

    def __init__(self, sshd: DeviceSSHD, **kw: Any) -> None:
        ProtocolChannel.__init__(self, **kw)
        self.protocol = sshd.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 22))


class TunnelConnection(ClientConnection):
    sshd: DeviceSSHD

    def channel_forwarded_tcpip(self, window: int, max_packet: int, data: bytes) -> Any:
        if self.sshd.refuse_channels:
            raise ConchError("connect failed", 2)
        return SSHDChannel(self.sshd, remoteWindow=window, remoteMaxPacket=max_packet)


class TunnelAuth(ClientAuth):
    def __init__(self, key: keys.Key, sshd: DeviceSSHD) -> None:
        ClientAuth.__init__(self, b"cms", key, None)
        self.instance = TunnelConnection()
        self.instance.sshd = sshd
        self._private = key  # type: ignore[attr-defined]


class TunnelTransport(ClientTransport):
    sshd: DeviceSSHD

    def connectionSecure(self) -> None:
        assert self.key is not None
        self.requestService(TunnelAuth(self.key, self.sshd))


# -- the operator ----------------------------------------------------------------

class OperatorChannel(channel.SSHChannel):
    """An operator's session: records stdout, stderr, EOF, exit status and close."""

    name = b"session"

    def __init__(self, requests: list[tuple[bytes, bytes]], stdin: bytes = b"",
                 eof: bool = False, **kw: Any) -> None:
        channel.SSHChannel.__init__(self, **kw)
        self.requests = requests
        self.stdin = stdin
        self.send_eof = eof
        self.out = b""
        self.err = b""
        self.eof = False
        self.status: int | None = None
        self.is_closed = False
        self.refused: str | None = None
        self.replies: list[bool] = []

    def channelOpen(self, specificData: bytes) -> None:
        for kind, data in self.requests:
            self.conn.sendRequest(self, kind, data, wantReply=1).addCallbacks(
                lambda _: self.replies.append(True), lambda _: self.replies.append(False))
        # Input typed at once, before the hub has set up the device session.
        for i in range(0, len(self.stdin), 1000):
            self.write(self.stdin[i:i + 1000])
        if self.send_eof:
            self.conn.sendEOF(self)

    def openFailed(self, reason: Any) -> None:
        self.refused = str(reason)

    def dataReceived(self, data: bytes) -> None:
        self.out += data

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.err += data

    def eofReceived(self) -> None:
        self.eof = True

    def request_exit_status(self, data: bytes) -> int:
        (self.status,) = struct.unpack(">L", data[:4])
        return 1

    def closed(self) -> None:
        self.is_closed = True
        self.loseConnection()


PTY = common.NS(b"xterm") + struct.pack(">4L", 80, 24, 0, 0) + common.NS(b"")


def shell(pty: bool = True) -> list[tuple[bytes, bytes]]:
    return [(b"pty-req", PTY)] * pty + [(b"shell", b"")]


def exec_(command: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"exec", common.NS(command))]


class Site:
    """A hub with node site-a online (tunnel with an `ssh` forward, host key pinned)
    and operator alice allowed `site-*`."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = MemoryReactorClock()
        self.hub: Hub = make_hub(tmp_path, self.clock, keepalive="0")
        self.factory: HubSSHFactory = start_factory(self.hub)
        self.pumps: list[IOPump] = []
        self.sshd = DeviceSSHD(self.clock, self.hub.keys.mgmt)
        self.alice = new_key()
        self.hub.registry.add_user("alice", None, [(self.alice.public().blob(), "fp")],
                                   ["site-*"], "test")
        self.device_key = self.enroll("site-a", self.sshd)
        self.tunnel = self.call_home(self.device_key, self.sshd)

    def enroll(self, name: str, sshd: DeviceSSHD, pin: bool = True) -> keys.Key:
        key = new_key()
        registry = self.hub.registry
        registry.register(name, key.public().blob(), "fp", "test")
        registry.set_state(name, "approved", "test")
        if pin:
            registry.set_device_access(name, "test", host_key=sshd.host_key.public().blob())
        return key

    def _connect(self, client: ClientTransport, peer: str) -> IOPump:
        addr = IPv4Address("TCP", peer, 40000)
        server = self.factory.buildProtocol(addr)
        pump = connect(server, FakeTransport(server, isServer=True, peerAddress=addr),
                       client, FakeTransport(client, isServer=False), greet=False,
                       clock=self.clock)
        self.pumps.append(pump)
        self.settle()
        return pump

    def call_home(self, key: keys.Key, sshd: DeviceSSHD, peer: str = "192.0.2.20"
                  ) -> TunnelTransport:
        client = TunnelTransport(b"cms", key, None)
        client.sshd = sshd
        self._connect(client, peer)
        conn = client.service
        answers: list[bool] = []
        conn.sendGlobalRequest(b"tcpip-forward", common.NS(b"") + struct.pack(">L", 0),
                               wantReply=1).addCallbacks(lambda _: answers.append(True),
                                                         lambda _: answers.append(False))
        self.settle()
        assert answers == [True]
        return client

    def operator(self, login: bytes, requests: list[tuple[bytes, bytes]],
                 key: keys.Key | None = None, stdin: bytes = b"", eof: bool = False
                 ) -> OperatorChannel:
        client = ClientTransport(login, key or self.alice, None)
        self._connect(client, "192.0.2.10")
        assert client.factory_state.get("connected"), "the operator did not log in"
        chan = OperatorChannel(requests, stdin, eof)
        client.service.openChannel(chan)
        self.settle()
        return chan

    def type(self, chan: OperatorChannel, data: bytes) -> None:
        chan.write(data)
        self.settle()

    def settle(self) -> None:
        """Pump every connection and run due calls until nothing moves."""
        for _ in range(200):
            moved = False
            for pump in self.pumps:
                moved = pump.pump() or moved
            self.clock.advance(0)
            if not moved and not any(c.getTime() <= self.clock.seconds()
                                     for c in self.clock.getDelayedCalls()):
                return
        raise AssertionError("the connections never settled")


def audit(hub: Hub) -> list[tuple[str, str, str]]:
    return [(e.action, e.target, e.detail) for e in hub.registry.audit_log()
            if e.action == "gateway"]

