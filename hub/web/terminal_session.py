"""One browser's web terminal: a WebSocket protocol driving a gateway session on a node.

It is a front end of `SessionMachine`, as the SSH session channel is, for a
session `ssh alice:NODE@hub` with a pty would be: the same grant check, login
to the device, relay and audit (`hub.access.device_end`). On the WebSocket,
binary messages are terminal bytes both ways; text messages are JSON control:
`{"resize": [cols, rows]}` from the browser, `{"exit": status}` (or
`{"exit": null, "signal": NAME}`) and `{"error": "why"}` from the hub as the
session ends.

Flow control: the device channel grants window only while the browser's TCP
connection takes what is written (this object is the HTTP request's push
producer), and the browser's connection is not read while the device's window
is used up; neither direction buffers more than a channel window in the hub.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.conch.ssh.common import NS, getNS
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from twisted.web.websocket import WebSocketTransport
from zope.interface import implementer

from hub.access.device_end import DeviceEnd, DeviceSession
from hub.access.reach import OperatorReach
from hub.rules.logins import OperatorLogin
from hub.rules.routes import Refusal, Route
from hub.rules.session import (
    Close,
    Count,
    DeviceEOF,
    DeviceRequest,
    Dial,
    DropDevice,
    Exit,
    OfferMenu,
    OperatorEOF,
    Outputs,
    Record,
    Relay,
    SessionMachine,
    StartSoon,
    State,
    Stderr,
    ToDevice,
    Write,
)
from hub.ssh.tcpwrite import no_delay

log = Logger()

TERM = b"xterm-256color"
MAX_SIZE = 1000  # columns or rows; a larger figure is a bad control message
# Twisted gathers a WebSocket message whole before handing it on; a paste
# larger than this in one message ends the session rather than the hub's memory.
MAX_MESSAGE = 1 << 20
DEFAULT_SIZE = (80, 24)


class ControlError(ValueError):
    """A text message from the browser that is not a control message we know."""


def pty_request(cols: int, rows: int) -> bytes:
    """A `pty-req` for xterm.js: TERM, size in characters, no pixel size, no modes."""
    return NS(TERM) + struct.pack(">4L", cols, rows, 0, 0) + NS(b"")


def window_change(cols: int, rows: int) -> bytes:
    return struct.pack(">4L", cols, rows, 0, 0)


def terminal_size(cols: object, rows: object) -> tuple[int, int]:
    """A (cols, rows) pair from the browser, checked; ControlError if it is not one."""
    if (not isinstance(cols, int) or not isinstance(rows, int) or isinstance(cols, bool)
            or isinstance(rows, bool) or not (1 <= cols <= MAX_SIZE and 1 <= rows <= MAX_SIZE)):
        raise ControlError(f"a terminal size is two whole numbers from 1 to {MAX_SIZE}")
    return cols, rows


def parse_control(message: str) -> tuple[int, int]:
    """The size a `{"resize": [cols, rows]}` message asks for."""
    try:
        value = json.loads(message)
    except ValueError:
        raise ControlError("a control message is JSON") from None
    if not isinstance(value, dict) or set(value) != {"resize"}:
        raise ControlError('the only control message is {"resize": [cols, rows]}')
    size = value["resize"]
    if not isinstance(size, list) or len(size) != 2:
        raise ControlError('resize takes [cols, rows]')
    return terminal_size(size[0], size[1])


class WebDeviceSession(DeviceSession):
    """The device end of a web terminal: its output goes to the browser."""

    data_views = False  # the WebSocket keeps what it is given until it is sent

    def __init__(self, front: WebTerminal) -> None:
        DeviceSession.__init__(self, front)
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        self.front.to_browser(data)
        self.recorded(data)
        self.relay_received(len(data))

    def extReceived(self, dataType: int, data: bytes) -> None:
        # With a pty the device sends no stderr; without one it shares the screen.
        self.dataReceived(data)

    # Conch calls these when the device's window is used up and given back.
    def stopWriting(self) -> None:
        self.front.hold_input()

    def startWriting(self) -> None:
        self.front.release_input()


@implementer(IPushProducer)
class WebTerminal(DeviceEnd):
    """A WebSocket protocol (`twisted.web.websocket.WebSocketProtocol`) that runs one
    session on `node` for `reach`'s operator; a `LiveOperator` while it is open."""

    how = " via web terminal"

    def __init__(self, reach: OperatorReach, node: str, size: tuple[int, int],
                 request: Request) -> None:
        self.owner = reach
        self.machine = SessionMachine(reach.login.user, node, None)
        self.machine.pty_requested(pty_request(*size))
        self.relay_bytes_in = 0
        self.transport: WebSocketTransport | None = None
        self._request = request
        self._open = False
        self._paused = False  # the browser's connection is not taking output
        self._told = False  # an error was sent: no exit status after it
        self._logged = False  # the refusal is in the log already
        self._unread = 0  # bytes received since the last whole message

    @property
    def login(self) -> OperatorLogin:
        return self.owner.login

    # -- the WebSocket ---------------------------------------------------------

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        self._open = True
        # The request stays open under the WebSocket: as its producer we hear
        # when the connection's send buffer fills and empties (the transport
        # itself already has the HTTP channel as its producer).
        self._request.registerProducer(self, True)
        no_delay(self._request.transport)  # keystrokes and their echo are small writes
        operators = self.owner.needs.operators
        if operators is not None:
            operators.add(self)
        self.run(self.machine.session_requested(b"shell", b"") or ())

    def guard(self, channel: Any) -> None:
        """Bound what the WebSocket may gather for one message: `channel` is the HTTP
        channel the request came on, whose `dataReceived` the upgrade replaced."""
        inner = channel.dataReceived

        def received(data: bytes) -> None:
            self._unread += len(data)
            if self._unread > MAX_MESSAGE:
                if self._open:
                    log.warn("{actor}: web terminal on {node}: a message over {max} bytes, "
                             "closing", actor=self.owner.actor, node=self.machine.node,
                             max=MAX_MESSAGE)
                    self._open = False
                    transport: Any = self._request.transport
                    transport.abortConnection()
                return
            inner(data)

        channel.dataReceived = received

    def bytesMessageReceived(self, data: bytes | bytearray) -> None:
        self._unread = 0
        data = bytes(data)
        self.run(self.machine.operator_data(data), data)

    def textMessageReceived(self, message: str) -> None:
        self._unread = 0
        try:
            cols, rows = parse_control(message)
        except ControlError as e:
            log.warn("{actor}: web terminal on {node}: bad control message: {why}",
                     actor=self.owner.actor, node=self.machine.node, why=str(e))
            self._logged = True
            self._end(f"bad control message: {e}")
            return
        device = self.relay_peer
        if self.machine.state is State.RELAYING and device is not None and device.relay_open():
            device.conn.sendRequest(device, b"window-change", window_change(cols, rows))
            self.resized(window_change(cols, rows))
        else:
            self.machine.pty_requested(pty_request(cols, rows))  # sent when the device opens

    def pongReceived(self, payload: bytes) -> None:
        self._unread = 0

    def connectionLost(self, reason: Failure) -> None:
        self._open = False
        operators = self.owner.needs.operators
        if operators is not None:
            operators.discard(self)
        self.run(self.machine.operator_closed())

    # -- flow control ------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self.relay_peer is not None:
            self.relay_peer.relay_hold()

    def resumeProducing(self) -> None:
        self._paused = False
        if self.relay_peer is not None:
            self.relay_peer.relay_release()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def hold_input(self) -> None:
        transport: Any = self._request.transport
        if transport is not None and self._open:
            transport.pauseProducing()

    def release_input(self) -> None:
        transport: Any = self._request.transport
        if transport is not None and self._open:
            transport.resumeProducing()

    def new_device(self) -> DeviceSession:
        device = WebDeviceSession(self)
        if self._paused:
            device.relay_hold()
        return device

    def to_browser(self, data: bytes) -> None:
        if self._open and self.transport is not None:
            self.transport.sendBytesMessage(bytes(data))

    def _send(self, message: dict[str, object]) -> None:
        if self._open and self.transport is not None:
            self.transport.sendTextMessage(json.dumps(message))

    def _close(self) -> None:
        if self._open and self.transport is not None:
            self._open = False
            self.transport.loseConnection()

    # -- LiveOperators ---------------------------------------------------------

    def end(self, why: str) -> None:
        """The operator's login no longer stands: end the session, saying why."""
        self._logged = True  # LiveOperators logged it
        self._end(why)

    def _end(self, why: str) -> None:
        if self.machine.state in (State.STARTING, State.CONNECTING, State.RELAYING):
            self.run(self.machine.failed(why))
        elif self._open:
            self._send({"error": why})
            self._close()

    def session_kind(self, route: Route) -> str:
        return "web terminal"

    # -- refusals ----------------------------------------------------------------

    def refused(self, refusal: Refusal) -> None:
        self._logged = refusal.note is not None  # reach logged why

    def _login_failed(self, f: Failure, node: str) -> None:
        self._logged = True  # logged as a warning there
        DeviceEnd._login_failed(self, f, node)

    # -- machine outputs -----------------------------------------------------------

    def run(self, outputs: Outputs, data: bytes = b"") -> None:
        for output in outputs:
            if isinstance(output, Relay | ToDevice):
                sent = data if isinstance(output, Relay) else output.data
                device = self.relay_peer
                if device is not None and device.relay_open():
                    device.write(sent)
                self.relay_bytes_in += len(sent)
            elif isinstance(output, Stderr):
                if not self._logged:
                    log.info("{actor}: web terminal on {node}: {why}", actor=self.owner.actor,
                             node=self.machine.node, why=output.message)
                self._logged = True
                self._told = True
                self._send({"error": output.message})
            elif isinstance(output, Exit):
                if not self._told:
                    self._send(exit_message(output.kind, output.data))
            elif isinstance(output, Close):
                self._close()
            elif isinstance(output, StartSoon):
                self.owner.needs.clock.callLater(0, lambda: self.run(self.machine.start()))
            elif isinstance(output, Dial):
                self.dial(output)
            elif isinstance(output, DeviceRequest):
                self.device_request(output)
            elif isinstance(output, DropDevice):
                self.drop_device()
            elif isinstance(output, Record):
                self.record(output)
            elif isinstance(output, Write):
                self.to_browser(output.data)
            elif isinstance(output, Count | DeviceEOF | OperatorEOF | OfferMenu):
                # No window to grant, no EOF on a WebSocket, no chooser (the node is given).
                pass


def exit_message(kind: bytes, data: bytes) -> dict[str, object]:
    """`{"exit": status}`, or `{"exit": null, "signal": NAME}` for an exit-signal."""
    if kind == b"exit-status" and len(data) >= 4:
        return {"exit": struct.unpack(">L", data[:4])[0]}
    try:
        name = bytes(getNS(data)[0]).decode("ascii", "replace")
    except struct.error:
        name = "?"
    return {"exit": None, "signal": name}
