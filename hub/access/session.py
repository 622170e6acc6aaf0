"""The operator's `session` channel and its device end: thin adapters of `SessionMachine`.

`GatewaySession` turns Conch's channel callbacks into machine inputs and
carries out the machine's outputs (the chooser's screen, a device login
through the node's tunnel, the relay, exit status, audit). `DeviceSession` is
the device end of the relay and reports what the device does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh import connection
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.device_client import DeviceConnection, DeviceError, connect
from hub.rules.logins import may_reach
from hub.rules.routes import Refusal
from hub.rules.session import (
    Close,
    Count,
    DeviceEOF,
    DeviceRequest,
    Dial,
    DropDevice,
    Exit,
    GiveWebLink,
    OfferMenu,
    OperatorEOF,
    Output,
    Outputs,
    Record,
    Relay,
    SessionMachine,
    StartSoon,
    State,
    Stderr,
    ToDevice,
    Write,
    exit_status,
)
from hub.tunnel.live import NodeTunnel
from hub.tunnel.relay import RelayChannel

if TYPE_CHECKING:
    from hub.access.gateway import OperatorAvatar

log = Logger()


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


class DeviceSession(RelayChannel):
    """The device end of a gateway session; reports to the operator's machine while current."""

    def __init__(self, operator: GatewaySession) -> None:
        RelayChannel.__init__(self, b"session")
        self.operator = operator

    def _report(self, outputs: Callable[[], Outputs]) -> None:
        # A device session the operator has let go of (failed, replaced) reports nothing.
        if self.operator.relay_peer is self:
            self.operator.run(outputs())

    def channelOpen(self, specificData: bytes) -> None:
        self._report(self.operator.machine.device_opened)

    def openFailed(self, reason: Any) -> None:
        self._report(lambda: self.operator.machine.device_refused(str(reason)))

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType in (b"exit-status", b"exit-signal"):
            self._report(lambda: self.operator.machine.device_exit(requestType, data))
            return 1
        return 0

    def eofReceived(self) -> None:
        self._report(self.operator.machine.device_eof)

    def closed(self) -> None:
        self._report(self.operator.machine.device_closed)


class GatewaySession(RelayChannel):
    """An operator's session channel: the chooser, or a device session relayed."""

    data_views = False  # the chooser keeps what it is given

    def __init__(self, avatar: OperatorAvatar, **kw: Any) -> None:
        RelayChannel.__init__(self, b"session", **kw)
        self.owner = avatar
        login = avatar.login
        self.machine = SessionMachine(login.user, login.node, login.port)
        self.device_conn: DeviceConnection | None = None
        self.node: str | None = None  # the node being reached or relayed to

    # -- Conch callbacks: machine inputs ---------------------------------------

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType == b"pty-req":
            self.machine.pty_requested(data)
            return 1
        if requestType in (b"window-change", b"signal"):
            peer = self.relay_peer
            if peer is not None and peer.relay_open():
                peer.conn.sendRequest(peer, requestType, data)
            return 1
        if requestType in (b"shell", b"exec", b"subsystem"):
            outputs = self.machine.session_requested(requestType, data)
            if outputs is None:
                return 0
            self.run(outputs)
            return 1
        return 0

    def dataReceived(self, data: bytes) -> None:
        self.run(self.machine.operator_data(data), data)

    def eofReceived(self) -> None:
        self.run(self.machine.operator_eof())

    def closed(self) -> None:
        self.run(self.machine.operator_closed())

    # -- machine outputs -------------------------------------------------------

    def run(self, outputs: Outputs, data: bytes = b"") -> None:
        """Carry out `outputs` in order; `data` is the operator data a `Relay` passes on."""
        for output in outputs:
            if isinstance(output, Relay):
                RelayChannel.dataReceived(self, data)
            else:
                self._carry_out(output)

    def _carry_out(self, output: Output) -> None:
        if isinstance(output, Write):
            if self.relay_open():
                self.write(output.data)
        elif isinstance(output, Stderr):
            if self.relay_open():
                self.writeExtended(connection.EXTENDED_DATA_STDERR,
                                   f"callhomehub: {output.message}\r\n".encode())
        elif isinstance(output, Count):
            self.relay_received(output.n)
        elif isinstance(output, StartSoon):
            # After the reply to the request has gone out.
            self.owner.needs.clock.callLater(0, lambda: self.run(self.machine.start()))
        elif isinstance(output, Dial):
            self._dial(output)
        elif isinstance(output, DeviceRequest):
            self._device_request(output)
        elif isinstance(output, ToDevice):
            if self.relay_peer is not None:
                self.relay_peer.write(output.data)
                self.relay_received(len(output.data))
        elif isinstance(output, DeviceEOF):
            RelayChannel.eofReceived(self)
        elif isinstance(output, OperatorEOF):
            self.after_flush(lambda: self.conn.sendEOF(self) if self.relay_open() else None)
        elif isinstance(output, Exit):
            self._later(output.flushed, lambda: self.conn.sendRequest(
                self, output.kind, output.data) if self.relay_open() else None)
        elif isinstance(output, Close):
            self._later(output.flushed, self.loseConnection)
        elif isinstance(output, OfferMenu):
            if self.relay_open():
                self._later(output.flushed, lambda: self.run(
                    self.machine.menu(self.owner.reachable(), output.before)))
        elif isinstance(output, DropDevice):
            self._drop_device()
        elif isinstance(output, Record):
            self._record(output)
        elif isinstance(output, GiveWebLink):
            self._weblink()

    def _weblink(self) -> None:
        owner = self.owner
        links = owner.needs.weblinks
        if links is None:
            self.run((Stderr("the web console is off on this hub (started with --web none)"),
                      exit_status(1), Close(flushed=True)))
            return
        tcp = getattr(self.conn.transport, "transport", None)
        arrived_at = getattr(tcp.getHost(), "host", "localhost") if tcp is not None else ""
        url = links.issue(owner.login, arrived_at or "localhost")
        owner.needs.grants.audit(owner.actor, "weblink", owner.login.user,
                                 "one-time web sign-in link issued")
        log.info("{actor}: web sign-in link issued", actor=owner.actor)
        self.run((Write(f"{url}\n".encode()), exit_status(0), Close(flushed=True)))

    def _later(self, flushed: bool, action: Callable[[], object]) -> None:
        if flushed:
            self.after_flush(action)
        else:
            action()

    # -- the device ------------------------------------------------------------

    def _dial(self, dial: Dial) -> None:
        owner, needs = self.owner, self.owner.needs
        route, link = owner.route(dial.node, dial.kind, dial.data, dial.port)
        if isinstance(route, Refusal):
            self.run(self.machine.failed(route.message))
            return
        log.info("{actor}: {kind} on {node}", actor=owner.actor, kind=route.label,
                 node=route.node)
        self.node = route.node
        self.run(self.machine.routed(route, needs.clock.seconds()))
        if route.netconf:
            # A new `netconf` subsystem channel on the node's call-home session.
            assert link is not None  # a route is only given for a live link
            self._open_device(link.conn)
            return
        assert isinstance(link, NodeTunnel)
        ready, _client = connect(link, route.user, needs.mgmt_key, route.host_key,
                                 clock=needs.clock)
        ready.addCallbacks(self._logged_in, self._login_failed, errbackArgs=(route.node,))

    def narrow(self, allow: tuple[str, ...]) -> None:
        """End the device session if `allow` no longer grants its node (the operator is
        told on stderr; a chooser session goes back to the menu)."""
        node = self.node
        if (node is None or may_reach(allow, node)
                or self.machine.state not in (State.CONNECTING, State.RELAYING)):
            return
        log.info("{actor}: access to node {node} withdrawn, ending the session",
                 actor=self.owner.actor, node=node)
        self.run(self.machine.failed(f"access to node {node} was withdrawn"))

    def _logged_in(self, conn: DeviceConnection) -> None:
        if self.machine.state is not State.CONNECTING:
            conn.close()  # the operator left meanwhile
            return
        self.device_conn = conn
        self._open_device(conn)

    def _login_failed(self, f: Failure, node: str) -> None:
        reason = f.value if isinstance(f.value, DeviceError) else f.getErrorMessage()
        log.warn("{actor}: cannot reach {node}: {why}", actor=self.owner.actor, node=node,
                 why=str(reason))
        self.run(self.machine.login_failed(node, str(reason)))

    def _open_device(self, conn: Any) -> None:
        device = DeviceSession(self)
        device.relay_peer, self.relay_peer = self, device
        conn.openChannel(device)

    def _device_request(self, request: DeviceRequest) -> None:
        device = self.relay_peer
        if device is None or not device.relay_open():
            return
        sent = device.conn.sendRequest(device, request.kind, request.data, wantReply=1)
        if sent is None:
            return
        refused = request.refused
        if refused is None:
            sent.addErrback(lambda f: None)
        else:
            sent.addErrback(lambda f: self.run(self.machine.failed(refused))
                            if self.relay_peer is device else None)

    def _drop_device(self) -> None:
        device, self.relay_peer = self.relay_peer, None
        if device is not None:
            device.relay_peer = None
            if device.relay_open():
                device.loseConnection()
        if self.device_conn is not None:
            self.device_conn.close()
            self.device_conn = None

    def _record(self, record: Record) -> None:
        device = self.relay_peer
        needs = self.owner.needs
        needs.grants.audit(
            self.owner.actor, "gateway", record.node,
            f"{record.label} start {stamp(record.started)} end {stamp(needs.clock.seconds())}"
            f" bytes to-device {self.relay_bytes_in}"
            f" from-device {device.relay_bytes_in if device is not None else 0}")
