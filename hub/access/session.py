"""The operator's `session` channel: a thin adapter of `SessionMachine`.

`GatewaySession` turns Conch's channel callbacks into machine inputs and
carries out the machine's outputs (the chooser's screen, the relay, exit
status); the device end (a device login through the node's tunnel, its
`session` channel, the audit) is `hub.access.device_end`, which the web
terminal shares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.ssh import connection
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.device_end import DeviceEnd, DeviceSession, stamp
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
from hub.ssh.channels import WINDOW
from hub.tunnel.relay import RelayChannel

if TYPE_CHECKING:
    from hub.access.gateway import OperatorAvatar
    from hub.access.reach import OperatorReach

__all__ = ["DeviceSession", "GatewaySession", "stamp"]

log = Logger()

# The window the operator's session channel offers until its device session relays:
# typed-ahead input is held until then (a command typed before the prompt), so this
# bounds what one channel can make the hub hold; a chooser line is far below it.
EARLY_WINDOW = 64 * 1024


class GatewaySession(DeviceEnd, RelayChannel):
    """An operator's session channel: the chooser, or a device session relayed."""

    data_views = False  # the chooser keeps what it is given

    def __init__(self, avatar: OperatorAvatar, **kw: Any) -> None:
        RelayChannel.__init__(self, b"session", **kw)
        self.owner = avatar
        login = avatar.login
        self.machine = SessionMachine(login.user, login.node, login.port)
        self.localWindowSize = self.localWindowLeft = EARLY_WINDOW
        # Window the operator still holds from a wider window than localWindowSize:
        # after a relay ends (back to the chooser), what it sends pays this off first.
        self._window_debt = 0

    # -- Conch callbacks: machine inputs ---------------------------------------

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType == b"pty-req":
            self.machine.pty_requested(data)
            return 1
        if requestType in (b"window-change", b"signal"):
            if requestType == b"window-change":
                self.resized(data)
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
        self._fit_window()

    def _fit_window(self) -> None:
        """The full window while relaying, EARLY_WINDOW otherwise."""
        relaying = self.machine.state is State.RELAYING
        if relaying and self.localWindowSize < WINDOW:
            extra = WINDOW - self.localWindowSize - self._window_debt
            self.localWindowSize, self._window_debt = WINDOW, 0
            if extra > 0 and self.relay_open():
                self.conn.adjustWindow(self, extra)
        elif not relaying and self.localWindowSize > EARLY_WINDOW:
            self._window_debt += self.localWindowSize - EARLY_WINDOW
            self.localWindowSize = EARLY_WINDOW

    def _relay_grant(self) -> None:
        paid = min(self._window_debt, self._relay_unacked)
        self._window_debt -= paid
        self._relay_unacked -= paid
        super()._relay_grant()

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
            self.dial(output)
        elif isinstance(output, DeviceRequest):
            self.device_request(output)
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
                self._later(output.flushed, lambda: self._offer_menu(output.before))
        elif isinstance(output, DropDevice):
            self.drop_device()
        elif isinstance(output, Record):
            self.record(output)
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

    def _offer_menu(self, before: bytes) -> None:
        """The chooser's menu, from the operator's grants and the nodes as the
        registry says now (read off the reactor)."""
        def offer(reach: OperatorReach) -> None:
            if self.relay_open():
                self.run(self.machine.menu(reach.reachable(), before))

        def failed(f: Failure) -> None:
            log.error("{actor}: reading the nodes for the menu failed: {why}",
                      actor=self.owner.actor, why=f.getErrorMessage())
            if self.relay_open():
                self.writeExtended(connection.EXTENDED_DATA_STDERR,
                                   f"callhomehub: the hub's registry failed: "
                                   f"{f.getErrorMessage()}\r\n".encode())
                self.loseConnection()

        self.owner.checked(every_node=True).addCallback(offer).addErrback(failed)

    def _later(self, flushed: bool, action: Callable[[], object]) -> None:
        if flushed:
            self.after_flush(action)
        else:
            action()
