"""An operator's gateway session as an explicit state machine: inputs in, outputs out, no I/O.

The Conch channel (`hub.access.session.GatewaySession`) turns its callbacks
into inputs and carries out the returned outputs in order.

States and moves (`MOVES` is the table the machine checks):

    awaiting-request --shell/exec/subsystem--> starting
    starting   --a node in the login name--> connecting
    starting   --a pty shell without a node: the menu is offered--> returning
    starting   --`weblink` without a node: a sign-in link is given--> closing
    returning  --menu(entries)--> choosing
    choosing   --a node chosen--> connecting;  --q--> closing
    connecting --device session opened--> relaying;  --refused/failed--> returning | closing
    relaying   --device session closed, or failed--> returning (menu) | closing (direct)
    any        --operator channel closed--> closed

"returning" waits for the menu to be shown again; "closing" waits for the
exit status and close to go out after the data before them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import Enum

from attrs import define, field, frozen

from hub.rules.chooser import Chooser, Entry, Quit, Select
from hub.rules.routes import Route


class State(Enum):
    AWAITING = "awaiting-request"
    STARTING = "starting"
    RETURNING = "returning"
    CHOOSING = "choosing"
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSING = "closing"
    CLOSED = "closed"


S = State
MOVES: dict[State, frozenset[State]] = {
    S.AWAITING: frozenset({S.STARTING, S.CLOSED}),
    S.STARTING: frozenset({S.CONNECTING, S.RETURNING, S.CLOSING, S.CLOSED}),
    S.RETURNING: frozenset({S.CHOOSING, S.CLOSED}),
    S.CHOOSING: frozenset({S.CONNECTING, S.CLOSING, S.CLOSED}),
    S.CONNECTING: frozenset({S.RELAYING, S.RETURNING, S.CLOSING, S.CLOSED}),
    S.RELAYING: frozenset({S.RETURNING, S.CLOSING, S.CLOSED}),
    S.CLOSING: frozenset({S.CLOSED}),
    S.CLOSED: frozenset({S.CLOSED}),
}


# -- outputs ------------------------------------------------------------------

@frozen
class Write:
    """Bytes for the operator's terminal (stdout)."""
    data: bytes


@frozen
class Stderr:
    """A message for the operator's stderr, as `callhomehub: <message>`."""
    message: str


@frozen
class Count:
    """Operator bytes consumed here (window is granted back for them)."""
    n: int


@frozen
class Relay:
    """Pass the operator's data just received on to the device session."""


@frozen
class GiveWebLink:
    """Print a one-time web console sign-in URL, then exit (`ssh alice@hub weblink`)."""


@frozen
class StartSoon:
    """Call `start()` on the next reactor turn (after the request's reply is out)."""


@frozen
class Dial:
    """Route `kind`/`data` to `node` and reach it: then `routed` and `device_opened`,
    or `failed`."""
    node: str
    kind: bytes
    data: bytes
    port: str | None


@frozen
class DeviceRequest:
    """A channel request to the device session; if it is refused, fail with `refused`
    (None: ignore the refusal)."""
    kind: bytes
    data: bytes
    refused: str | None


@frozen
class ToDevice:
    """Operator input held while the device session was set up, now sent (and counted)."""
    data: bytes


@frozen
class DeviceEOF:
    """The operator's EOF, to the device once the data before it is out."""


@frozen
class OperatorEOF:
    """The device's EOF, to the operator once the data before it is out."""


@frozen
class Exit:
    """An exit-status/exit-signal request to the operator; `flushed`: after its data."""
    kind: bytes
    data: bytes
    flushed: bool


@frozen
class Close:
    """Close the operator's channel; `flushed`: after its data."""
    flushed: bool


@frozen
class OfferMenu:
    """Call `menu(entries, before)` now, or once the operator's data is out (`flushed`)."""
    before: bytes
    flushed: bool


@frozen
class DropDevice:
    """Close the device session and its connection, and stop relaying to it."""


@frozen
class Record:
    """Write the audit record of the device session that started at `started`."""
    node: str
    label: str
    started: float


Output = (Write | Stderr | Count | Relay | StartSoon | Dial | DeviceRequest | ToDevice
          | DeviceEOF | OperatorEOF | Exit | Close | OfferMenu | DropDevice | Record
          | GiveWebLink)
Outputs = Sequence[Output]

_RELAY: Outputs = (Relay(),)


def exit_status(status: int) -> Exit:
    return Exit(b"exit-status", struct.pack(">L", status), flushed=True)


class IllegalMove(Exception):
    """A move `MOVES` does not allow: a bug in the machine."""


@define(eq=False)
class SessionMachine:
    """One operator session channel. `node`/`port`: what the login name selected."""

    user: str
    node: str | None = None
    port: str | None = None
    state: State = State.AWAITING
    pty: bytes | None = None
    menu_mode: bool = False  # the session began at the chooser and returns to it
    exit_sent: bool = False
    _request: tuple[bytes, bytes] = (b"", b"")
    # Operator input (and EOF) held while the device session is set up; the
    # channel window bounds it, as window is granted only once it is sent.
    _pending: list[bytes] = field(factory=list)
    _eof_pending: bool = False
    _chooser: Chooser | None = None
    _route: Route | None = None
    _audit: tuple[str, str, float] | None = None
    _last_node: str | None = None

    def _move(self, to: State) -> None:
        if to not in MOVES[self.state]:
            raise IllegalMove(f"{self.state.value} -> {to.value}")
        self.state = to

    # -- the operator's requests ---------------------------------------------

    def pty_requested(self, data: bytes) -> None:
        self.pty = data

    def session_requested(self, kind: bytes, data: bytes) -> Outputs | None:
        """shell/exec/subsystem: accepted (outputs) once per channel, else None."""
        if self.state is not State.AWAITING:
            return None
        self._request = (kind, data)
        self._move(State.STARTING)
        return (StartSoon(),)

    def start(self) -> Outputs:
        if self.state is not State.STARTING:
            return ()
        kind, data = self._request
        if self.node is not None:
            return self._dial(self.node, kind, data, self.port)
        if kind == b"exec" and data[4:].strip() == b"weblink":
            self._move(State.CLOSING)
            return (GiveWebLink(),)
        if kind == b"shell" and self.pty is not None:
            self._pending = []  # nothing typed before the menu is shown counts
            self.menu_mode = True
            self._move(State.RETURNING)
            return (OfferMenu(b"", flushed=False),)
        return self.failed(f"no node selected: use ssh {self.user}:NODE@hub, "
                           "or a terminal for the chooser")

    def menu(self, entries: list[Entry], before: bytes) -> Outputs:
        if self.state is not State.RETURNING:
            return ()
        self._chooser = Chooser(entries)
        self._move(State.CHOOSING)
        return (Write(before + self._chooser.menu()),)

    # -- the operator's data -------------------------------------------------

    def operator_data(self, data: bytes) -> Outputs:
        state = self.state
        if state is State.RELAYING:
            return _RELAY
        if state in (State.STARTING, State.CONNECTING):
            self._pending.append(data)
            return ()
        if state is State.CHOOSING and self._chooser is not None:
            return self._choose(self._chooser, data)
        return (Count(len(data)),)  # nobody to give it to

    def _choose(self, chooser: Chooser, data: bytes) -> Outputs:
        echo, decision = chooser.feed(data)
        out: list[Output] = [Count(len(data))]
        if echo:
            out.append(Write(echo))
        if isinstance(decision, Quit):
            self._chooser = None
            self._move(State.CLOSING)
            out += [Exit(b"exit-status", struct.pack(">L", 0), flushed=False),
                    Close(flushed=False)]
        elif isinstance(decision, Select):
            self._chooser = None
            out += self._dial(decision.node, b"shell", b"", None)
        return out

    def operator_eof(self) -> Outputs:
        if self.state in (State.STARTING, State.CONNECTING):
            self._eof_pending = True
            return ()
        if self.state is State.RELAYING:
            return (DeviceEOF(),)
        return ()

    def operator_closed(self) -> Outputs:
        out = [*self._record(), DropDevice()]
        self._move(State.CLOSED)
        return out

    # -- reaching the device -------------------------------------------------

    def _dial(self, node: str, kind: bytes, data: bytes, port: str | None) -> Outputs:
        self._move(State.CONNECTING)
        return (Dial(node, kind, data, port),)

    def routed(self, route: Route, now: float) -> Outputs:
        """The route `Dial` found; the device session is being set up."""
        if self.state is State.CONNECTING:
            self._route = route
            self._audit = (route.node, route.label, now)
        return ()

    def login_failed(self, node: str, reason: str) -> Outputs:
        return self.failed(f"cannot log in to {node}: {reason}")

    def device_refused(self, reason: str) -> Outputs:
        return self.failed(f"the device refused a session: {reason}")

    def device_opened(self) -> Outputs:
        if self.state is not State.CONNECTING or self._route is None:
            return (DropDevice(),)  # the operator left meanwhile
        self._move(State.RELAYING)
        out: list[Output] = []
        if self.pty is not None:
            out.append(DeviceRequest(b"pty-req", self.pty, None))
        kind, data = self._route.request
        out.append(DeviceRequest(kind, data, f"the device refused the {kind.decode()} request"))
        pending, self._pending = b"".join(self._pending), []
        if pending:
            out.append(ToDevice(pending))
        if self._eof_pending:
            self._eof_pending = False
            out.append(DeviceEOF())
        return out

    def failed(self, message: str) -> Outputs:
        """The session cannot go on: say why, then back to the menu or exit status 1."""
        state = self.state
        self._pending = []
        if state not in (State.STARTING, State.CONNECTING, State.RELAYING):
            return ()  # already failed, ended or closed
        out: list[Output] = [Stderr(message)]
        if self.menu_mode:
            if state is State.RELAYING:
                out += self._record()
            out.append(DropDevice())
            self._move(State.RETURNING)
            out.append(OfferMenu(b"", flushed=False))
            return out
        self._move(State.CLOSING)
        return [*out, exit_status(1), Close(flushed=True)]

    # -- the device session --------------------------------------------------

    def device_exit(self, kind: bytes, data: bytes) -> Outputs:
        """exit-status or exit-signal from the device: the operator's, in a direct session."""
        self.exit_sent = True
        if self.menu_mode:
            return ()
        return (Exit(kind, data, flushed=True),)

    def device_eof(self) -> Outputs:
        return () if self.menu_mode else (OperatorEOF(),)

    def device_closed(self) -> Outputs:
        out: list[Output] = [*self._record(), DropDevice()]
        if self.state is not State.RELAYING:
            return out
        if self.menu_mode:
            self._move(State.RETURNING)
            name = self._last_node or "the node"
            out.append(OfferMenu(f"\r\nConnection to {name} closed.\r\n".encode(), flushed=True))
            return out
        self._move(State.CLOSING)
        if not self.exit_sent:
            out.append(exit_status(255))
        out.append(Close(flushed=True))
        return out

    def _record(self) -> list[Output]:
        if self._audit is None:
            return []
        node, label, started = self._audit
        self._audit = None
        self._last_node = node
        return [Record(node, label, started)]
