"""The device end of an operator's session, shared by every front end that drives one.

A front end (the SSH session channel `hub.access.session.GatewaySession`, the
web terminal's WebSocket) runs a `SessionMachine` and carries out its outputs.
The outputs about the device (`Dial`, `DeviceRequest`, `DropDevice`,
`Record`) are carried out here, the same way for each: the grant check and
route of the operator's `OperatorReach`, the hub's login to the device through
its tunnel with the management key and the pinned host key, the device's
`session` channel, the audit record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.device_client import DeviceConnection, DeviceError, connect
from hub.access.reach import OperatorReach
from hub.access.recordings import SessionRecord
from hub.rules.logins import may_reach
from hub.rules.routes import Refusal, Route
from hub.rules.session import (
    DeviceRequest,
    Dial,
    Outputs,
    Record,
    SessionMachine,
    State,
)
from hub.tunnel.live import NodeTunnel
from hub.tunnel.relay import RelayChannel

log = Logger()


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


class DeviceSession(RelayChannel):
    """The device end of a session; reports to the front end's machine while current."""

    def __init__(self, operator: DeviceEnd) -> None:
        RelayChannel.__init__(self, b"session")
        self.operator = operator

    def _report(self, outputs: Callable[[], Outputs]) -> None:
        # A device session the operator has let go of (failed, replaced) reports nothing.
        if self.operator.relay_peer is self:
            self.operator.run(outputs())

    def channelOpen(self, specificData: bytes) -> None:
        self._report(self.operator.machine.device_opened)
        if self.operator.relay_peer is self and self.operator.machine.state is State.RELAYING:
            self.operator.session_opened()

    def recorded(self, data: bytes | memoryview) -> None:
        """The operator's terminal is sent `data`: the recording gets it too."""
        record = self.operator.session_record
        if record is not None and self.operator.relay_peer is self:
            record.output(data)

    # The operator's terminal first: the recording never goes ahead of it.
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.recorded(data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        super().extReceived(dataType, data)
        self.recorded(data)

    def openFailed(self, reason: Any) -> None:
        self._report(lambda: self.operator.machine.device_refused(str(reason)))

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType in (b"exit-status", b"exit-signal"):
            record = self.operator.session_record
            if record is not None and self.operator.relay_peer is self:
                record.exited(requestType, data)
            self._report(lambda: self.operator.machine.device_exit(requestType, data))
            return 1
        return 0

    def eofReceived(self) -> None:
        self._report(self.operator.machine.device_eof)

    def closed(self) -> None:
        self._report(self.operator.machine.device_closed)


class DeviceEnd:
    """Mixed into a front end: reaches the device for its `machine`, as `owner` may.

    The front end provides `run` (carry out outputs), `relay_bytes_in` (the
    operator's bytes passed to the device, for the audit) and may override
    `new_device` (the device channel), `refused` and `how` (the audit's
    label suffix)."""

    owner: OperatorReach
    machine: SessionMachine
    relay_peer: Any = None  # the current device channel
    relay_bytes_in: int
    device_conn: DeviceConnection | None = None
    node: str | None = None  # the node being reached or relayed to
    how: str = ""  # appended to the session's label in the audit ("" for SSH)
    route_taken: Route | None = None  # where the current device session goes
    session_record: SessionRecord | None = None  # its sessions row and recording

    def run(self, outputs: Outputs, data: bytes = b"") -> None:
        raise NotImplementedError

    def new_device(self) -> DeviceSession:
        return DeviceSession(self)

    def refused(self, refusal: Refusal) -> None:
        """The route was refused (`refusal.message` goes to the operator next)."""

    # -- outputs about the device ------------------------------------------------

    def dial(self, dial: Dial) -> None:
        """Route `dial` on the operator's grants as the registry says now (read off
        the reactor), then reach the device."""
        state = self.machine.state

        def failed(f: Failure) -> None:
            log.error("{actor}: checking access to {node} failed: {why}",
                      actor=self.owner.actor, node=dial.node, why=f.getErrorMessage())
            if self.machine.state is state:
                self.run(self.machine.failed(
                    f"the hub's registry failed: {f.getErrorMessage()}"))

        self.owner.checked(dial.node).addCallback(self._dial, dial, state).addErrback(failed)

    def _dial(self, reach: OperatorReach, dial: Dial, state: State) -> None:
        if self.machine.state is not state:
            return  # the operator left (or the session moved on) meanwhile
        owner, needs = self.owner, self.owner.needs
        route, link = reach.route(dial.node, dial.kind, dial.data, dial.port)
        if isinstance(route, Refusal):
            self.refused(route)
            self.run(self.machine.failed(route.message))
            return
        log.info("{actor}: {kind} on {node}{how}", actor=owner.actor, kind=route.label,
                 node=route.node, how=self.how)
        self.node = route.node
        self.route_taken = route
        self.run(self.machine.routed(route, needs.clock.seconds()))
        if route.netconf:
            # A new `netconf` subsystem channel on the node's call-home session.
            assert link is not None  # a route is only given for a live link
            self.open_device(link.conn)
            return
        assert isinstance(link, NodeTunnel)
        ready, _client = connect(link, route.user, needs.mgmt_key, route.host_key,
                                 clock=needs.clock)
        ready.addCallbacks(self._logged_in, self._login_failed, errbackArgs=(route.node,))

    def narrow(self, allow: tuple[str, ...]) -> None:
        """End the device session if `allow` no longer grants its node (the operator is
        told; a chooser session goes back to the menu)."""
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
        self.open_device(conn)

    def _login_failed(self, f: Failure, node: str) -> None:
        reason = f.value if isinstance(f.value, DeviceError) else f.getErrorMessage()
        log.warn("{actor}: cannot reach {node}: {why}", actor=self.owner.actor, node=node,
                 why=str(reason))
        self.run(self.machine.login_failed(node, str(reason)))

    def open_device(self, conn: Any) -> None:
        device = self.new_device()
        device.relay_peer, self.relay_peer = self, device
        conn.openChannel(device)

    def device_request(self, request: DeviceRequest) -> None:
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

    def drop_device(self) -> None:
        device, self.relay_peer = self.relay_peer, None
        if device is not None:
            device.relay_peer = None
            if device.relay_open():
                device.loseConnection()
        if self.device_conn is not None:
            self.device_conn.close()
            self.device_conn = None

    def session_kind(self, route: Route) -> str:
        """What the sessions table calls this session (`shell`, `exec`, ...)."""
        return route.label

    def session_opened(self) -> None:
        """The device session is open: its sessions row, and its recording with a pty."""
        recordings, route = self.owner.needs.recordings, self.route_taken
        if recordings is None or route is None:
            return
        self.session_record = recordings.begin(
            self.owner.login.user, route.node, self.owner.peer, self.session_kind(route),
            route.request, self.machine.pty)

    def resized(self, window_change: bytes) -> None:
        """The operator's terminal changed size (an SSH `window-change` payload)."""
        if self.session_record is not None:
            self.session_record.resized(window_change)

    def record(self, record: Record) -> None:
        device = self.relay_peer
        needs = self.owner.needs
        session, self.session_record = self.session_record, None
        if session is not None:
            session.finish(self.relay_bytes_in,
                           device.relay_bytes_in if device is not None else 0)
        needs.grants.audit(
            self.owner.actor, "gateway", record.node,
            f"{record.label}{self.how} start {stamp(record.started)}"
            f" end {stamp(needs.clock.seconds())}"
            f" bytes to-device {self.relay_bytes_in}"
            f" from-device {device.relay_bytes_in if device is not None else 0}")
