"""The registrar user (`cms`): what a calling-home device may do, and nothing more.

`register [NAME]` with a public key on stdin records the device; every other
session request gets the Lighthouse refusal line. Channel types other than
`session` and the in-tunnel NSCA intake are refused with a reason.
"""

from __future__ import annotations

import shlex
import struct
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import channel, common, connection
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.needs import RegistrarNeeds
from hub.errors import BadKey, BadName, RegistryError
from hub.rules.logins import DeviceLogin
from hub.rules.names import check_node_name, default_node_name
from hub.rules.ports import MAX_PORT
from hub.ssh.connection import ChannelRefused
from hub.ssh.keys import parse_public_key
from hub.ssh.wire import WireError, unpack_forward_request, unpack_tcpip_open
from hub.store.rows import Node
from hub.tunnel.live import NodeTunnel

log = Logger()

MAX_KEY_UPLOAD = 16 * 1024
NSCA_TARGETS = {(b"localhost", 5667), (b"127.0.0.1", 5667)}


def no_shell_line(user: str) -> bytes:
    return f"User '{user}' does not have shell access on this device\n".encode()


def usage(user: str) -> bytes:
    """What the registrar user can do, shown after the refusal of anything else."""
    return (f"{user} can only register a device and carry its tunnel:\n"
            f"  ssh {user}@HUB register [NAME] < id_ed25519.pub   (once, with the Call Home "
            "Password)\n"
            f"  ssh -N -R 0:localhost:22 {user}@HUB              (then, with the device's key)\n"
            ).encode()


@frozen
class Outcome:
    status: int
    stdout: bytes = b""
    stderr: bytes = b""


def register(needs: RegistrarNeeds, args: list[str], upload: bytes,
             actor: str) -> defer.Deferred[Outcome]:
    """Run `register [NAME]` on an uploaded key; the outcome a device sees (once
    the registry, off the reactor, has recorded the key)."""
    if len(args) > 1:
        return defer.succeed(Outcome(1, stderr=b"usage: register [NAME] < id_ed25519.pub\n"))

    def refused(e: Exception) -> Outcome:
        log.info("registration by {actor} refused: {why}", actor=actor, why=str(e))
        return Outcome(1, stderr=f"register: {e}\n".encode())

    def failed(f: Failure) -> Outcome:
        f.trap(RegistryError)
        return refused(f.value)  # type: ignore[arg-type]

    try:
        key = parse_public_key(upload)
        name = check_node_name(args[0]) if args else default_node_name(key)
    except (BadKey, BadName) as e:
        return defer.succeed(refused(e))
    recorded = defer.maybeDeferred(needs.enrollment.register, name, key.blob,
                                   key.fingerprint, actor)
    return recorded.addCallbacks(lambda got: _registered(needs, name, actor, *got), failed)


def _registered(needs: RegistrarNeeds, name: str, actor: str, node: Node,
                created: bool) -> Outcome:
    if node.state == "revoked":
        return Outcome(1, stderr=f"register: this key belongs to revoked node {node.name}\n"
                       .encode())
    if created:
        log.info("registered node {node} ({fp}) for {actor}", node=node.name,
                 fp=node.fingerprint, actor=actor)
    state = ("pending approval on the hub" if node.state == "pending" else node.state)
    if node.name.lower() != name.lower():
        note = f"register: this key is already registered as node {node.name} ({state})\n"
    else:
        note = f"register: node {node.name} is {state}\n"
    # stdout is the management key alone: a device script appends it as it is.
    return Outcome(0, stdout=needs.mgmt_public_line.encode(), stderr=note.encode())


class RegistrarSession(channel.SSHChannel):
    """A session channel of the registrar user: `register` or a refusal."""

    name = b"session"
    conn: Any

    def __init__(self, avatar: RegistrarAvatar, **kw: Any) -> None:
        channel.SSHChannel.__init__(self, avatar=avatar, **kw)
        self.registrar = avatar
        self._upload: bytearray | None = None
        self._args: list[str] = []
        self._done = False
        self._pty = False  # lines end in CR LF on a terminal

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        handler = {
            b"pty-req": self.request_pty_req,
            b"shell": self.request_shell,
            b"exec": self.request_exec,
            b"window-change": lambda data: 1,
        }.get(requestType)
        if handler is None:
            # Subsystems, agent and X11 forwarding, env, signals: all refused.
            log.info("{actor}: refused session request {req}", actor=self.registrar.actor,
                     req=requestType.decode("ascii", "replace"))
            return 0
        return handler(data)

    def request_pty_req(self, data: bytes) -> int:
        # Accepted (nothing is allocated) so that `ssh -t cms@hub` shows the
        # refusal line instead of OpenSSH's fatal "PTY allocation failed".
        self._pty = True
        return 1

    def request_shell(self, data: bytes) -> int:
        self.registrar.needs.clock.callLater(0, self._refuse)
        return 1

    def request_exec(self, data: bytes) -> int:
        command = common.getNS(data)[0].decode("utf-8", "replace")
        try:
            argv = shlex.split(command)
        except ValueError:
            argv = []
        if argv[:1] == ["register"]:
            self._args = argv[1:]
            self._upload = bytearray()
        else:
            log.info("{actor}: refused command {cmd!r}", actor=self.registrar.actor, cmd=command)
            self.registrar.needs.clock.callLater(0, self._refuse, True)
        return 1

    def _refuse(self, with_usage: bool = False) -> None:
        user = self.registrar.needs.user
        text = no_shell_line(user) + (usage(user) if with_usage else b"")
        self._finish(Outcome(1, stderr=text))

    def dataReceived(self, data: bytes) -> None:
        if self._upload is None:
            return
        self._upload += data
        if len(self._upload) > MAX_KEY_UPLOAD:
            self._upload = None
            self._finish(Outcome(1, stderr=b"register: input too long for a public key\n"))

    def eofReceived(self) -> None:
        if self._upload is not None:
            upload, self._upload = bytes(self._upload), None
            register(self.registrar.needs, self._args, upload,
                     self.registrar.actor).addCallback(self._finish)

    def _finish(self, outcome: Outcome) -> None:
        if self._done or self.closing:
            return
        self._done = True
        stdout, stderr = outcome.stdout, outcome.stderr
        if self._pty:  # a terminal in raw mode: a bare LF would not return the cursor
            stdout, stderr = (b.replace(b"\n", b"\r\n") for b in (stdout, stderr))
        if stdout:
            self.write(stdout)
        if stderr:
            self.writeExtended(connection.EXTENDED_DATA_STDERR, stderr)
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", outcome.status))
        self.conn.sendEOF(self)
        self.loseConnection()

    def closed(self) -> None:
        self.loseConnection()


class RegistrarAvatar(ConchUser):
    """The registrar user, logged in by password (node None) or by a node's key."""

    def __init__(self, needs: RegistrarNeeds, login: DeviceLogin, peer: Callable[[], str]
                 ) -> None:
        ConchUser.__init__(self)
        self.needs = needs
        self.node = login.node
        # The node as the login read it, for the takeover (`LiveSessions.attach`).
        self._login = login
        self._peer = peer
        self.conn: Any = None
        self.tunnel: NodeTunnel | None = None
        # Forward requests waiting for the takeover (the node's record is read
        # off the reactor), in arrival order; None when no takeover is under way.
        self._waiting: list[defer.Deferred[NodeTunnel | None]] | None = None
        self._gone = False

    @property
    def actor(self) -> str:
        who = self.node or self.needs.user
        return f"{who}@{self._peer()}"

    def connection_started(self, conn: Any) -> None:
        # No takeover at login: a re-register or a check by the device, or
        # `ssh cms@hub` by hand, must not drop its running tunnel. The first
        # forward request takes over (`_tunnel`).
        self.conn = conn
        if self.node is not None:
            self.needs.tunnels.join(self.node, conn, self._peer())

    def logout(self) -> None:
        self._gone = True
        if self.tunnel is not None:
            self.needs.tunnels.detach(self.tunnel)
        elif self.node is not None and self.conn is not None:
            self.needs.tunnels.leave(self.node, self.conn)

    def _tunnel(self) -> defer.Deferred[NodeTunnel | None]:
        """This connection's tunnel; the first call takes the node over."""
        if self.tunnel is not None or self.node is None or self.conn is None:
            return defer.succeed(self.tunnel)
        waiter: defer.Deferred[NodeTunnel | None] = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]

        def attached(tunnel: NodeTunnel | None) -> None:
            waiting, self._waiting = self._waiting or [], None
            if tunnel is not None and self._gone:  # logged out meanwhile
                self.needs.tunnels.detach(tunnel)
                tunnel = None
            self.tunnel = tunnel
            for each in waiting:
                each.callback(tunnel)

        def failed(f: Failure) -> None:
            log.error("{actor}: takeover failed: {why}", actor=self.actor,
                      why=f.getErrorMessage())
            attached(None)

        login, self._login = self._login, DeviceLogin(self.node)  # read once at most
        self.needs.tunnels.attach(self.node, self.conn, self._peer(), login.record,
                                  login.read_at).addCallbacks(attached, failed)
        return waiter

    def lookupChannel(self, channel_type: bytes, window: int, max_packet: int,
                      data: bytes) -> Any:
        if channel_type == b"session":
            return RegistrarSession(self, remoteWindow=window, remoteMaxPacket=max_packet)
        if channel_type == b"direct-tcpip":
            try:
                target = unpack_tcpip_open(data)
            except WireError as e:
                raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                     f"malformed direct-tcpip request: {e}") from None
            host, port = target.host, target.port
            if (host.lower(), port) in NSCA_TARGETS:
                if self.node is None:
                    raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                         "only a registered node's key may send results")
                intake = self.needs.intake
                if intake is not None:
                    return intake(self.node, self.actor, window, max_packet)
                raise ChannelRefused(connection.OPEN_CONNECT_FAILED,
                                     "the NSCA intake is not running on this hub")
            raise ChannelRefused(
                connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"forwarding to {host.decode('utf-8', 'replace')}:{port} is not allowed; "
                "only the NSCA intake (localhost:5667)",
            )
        raise ChannelRefused(
            connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
            f"channel type {channel_type.decode('ascii', 'replace')} is not allowed "
            f"for {self.needs.user}",
        )

    def gotGlobalRequest(self, request_type: bytes, data: bytes) -> Any:
        if request_type in (b"tcpip-forward", b"cancel-tcpip-forward"):
            if self.node is None:
                log.info("{actor}: refused {req}: only a registered node's key may forward",
                         actor=self.actor, req=request_type.decode())
                return 0
            try:
                request = unpack_forward_request(data)
            except WireError as e:
                log.info("{actor}: malformed {req}: {why}", actor=self.actor,
                         req=request_type.decode(), why=str(e))
                return 0
            if request_type == b"cancel-tcpip-forward":
                # A connection that never forwarded has nothing to cancel and
                # takes nothing over.
                if self.tunnel is None and self._waiting is None:
                    return 0
                return self._tunnel().addCallback(
                    lambda t: 0 if t is None else t.cancel_forward(request.bind, request.port))
            if request.port > MAX_PORT:
                # Refused before the takeover: a request no forward can be made of.
                log.warn("{actor}: forward {bind}:{port} refused: port {port} is above {max}",
                         actor=self.actor, bind=request.bind.decode("utf-8", "replace"),
                         port=request.port, max=MAX_PORT)
                return 0
            return self._tunnel().addCallback(
                lambda t: 0 if t is None else t.request_forward(request.bind, request.port))
        if request_type != b"keepalive@openssh.com":  # answered "failure", as sshd does
            log.info("{actor}: refused global request {req}", actor=self.actor,
                     req=request_type.decode("ascii", "replace"))
        return 0
