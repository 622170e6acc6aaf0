"""Master/clone pairs while the hub runs: the member each pair reaches, and the pair's own ports.

The pair's own SDT ports (one lease per service its active member forwards,
leased to the pair like a node's) accept connections and pipe each into the
active member's forward through `NodeTunnel`'s pipe, so a new connection goes
to whichever member is active when it arrives; a connection already piped
stays with its member. `LiveSessions` tells this object when a tunnel comes
or goes, a forward is added or cancelled, or the registry changed; a change
of the active member is logged and audited (`pair-switch`).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from attrs import define, field
from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.errors import NotFound, PortsExhausted
from hub.rules.pairs import Pair, active_member
from hub.rules.routes import Refusal
from hub.store.registry import Registry
from hub.tunnel.live import BIND_ATTEMPTS, LOOPBACK, NodeTunnel, PortListener
from hub.tunnel.splice import TCPEnd

if TYPE_CHECKING:
    from hub.tunnel.sessions import LiveSessions

log = Logger()


class PairListener(protocol.Factory):
    """Accepts connections on a pair's port; each goes to the active member's forward."""

    noisy = False

    def __init__(self, pairs: LivePairs, pair: str, service: str) -> None:
        self.pairs = pairs
        self.pair = pair
        self.service = service

    def buildProtocol(self, addr: Any) -> TCPEnd | None:
        tunnel = self.pairs.active_tunnel(self.pair)
        forward = None if tunnel is None else tunnel.table.lookup(self.service)
        if tunnel is None or tunnel.closed or forward is None:
            log.info("pair {pair}: no online member forwards {service}, refusing a connection",
                     pair=self.pair, service=self.service)
            return None
        reserve = self.pairs.sessions.descriptors
        if reserve is not None and not reserve.allows(f"pair {self.pair} {self.service}"):
            return None
        end = TCPEnd()
        end.on_connect = lambda: tunnel.open_pipe(forward, end, addr)
        return end


@define(eq=False)
class LivePairs:
    """The pairs on file, their active member and their listeners."""

    sessions: LiveSessions
    _pairs: dict[str, Pair] | None = None  # lower-cased name -> pair; None: read again
    _active: dict[str, str | None] = field(factory=dict)
    _listening: dict[str, dict[str, tuple[int, PortListener]]] = field(factory=dict)
    _public: dict[str, bool] = field(factory=dict)
    _rebinding: set[str] = field(factory=set)
    # Listeners of (pair, service) being closed: the port is listened on again
    # only once it is free, or another lease would be taken.
    _closing: dict[tuple[str, str], defer.Deferred[None]] = field(factory=dict)
    # The members' states, as read with their tunnel's takeover and on each registry
    # change (an in-memory view: nothing is read from the registry on the reactor).
    _states: dict[str, str] = field(factory=dict)
    # (pair, service) whose port is being leased in the registry thread.
    _leasing: set[tuple[str, str]] = field(factory=set)

    def _all(self) -> dict[str, Pair]:
        if self._pairs is None:
            # None known until the registry thread answers; `reload` then updates each.
            self._pairs = {}
            self._load()
        return self._pairs

    def _load(self) -> None:
        def failed(f: Failure) -> None:
            log.error("reading the master/clone pairs failed: {why}", why=f.getErrorMessage())

        self.sessions.calls.call(Registry.pairs).addCallbacks(self.reload, failed)

    def known(self, nodes: dict[str, str]) -> None:
        """Nodes' states as last read off the reactor, lower-cased name -> state."""
        self._states.update(nodes)

    def reload(self, listed: list[Pair] | None = None) -> None:
        """The registry changed (a pair added or deleted, access switched, a member revoked);
        `listed` is the pairs on file, read off the reactor (None: read them first)."""
        if listed is None:
            self._load()
            return
        self._pairs = pairs = {p.name.lower(): p for p in listed}
        for key in [k for k in self._active if k not in pairs]:
            del self._active[key]
            self._public.pop(key, None)
            self._stop_all(key)
        for pair in pairs.values():
            self._update(pair)

    def node_changed(self, node: str) -> None:
        """`node`'s tunnel came or went, or its forwards changed."""
        for pair in self._all().values():
            if pair.role(node) is not None:
                self._update(pair)

    def active(self, pair: str) -> str | None:
        """The member `pair` reaches now (as last worked out), or None."""
        return self._active.get(pair.lower())

    def active_tunnel(self, pair: str) -> NodeTunnel | None:
        member = self.active(pair)
        return None if member is None else self.sessions.local(member)

    def ports(self, pair: str) -> dict[str, int]:
        """The pair's ports listening now, service -> port."""
        return {s: port for s, (port, _) in self._listening.get(pair.lower(), {}).items()}

    # -- working it out ----------------------------------------------------------

    def _online(self, member: str) -> bool:
        # Wherever it is held (`get` finds a member another hub holds): every hub of
        # a fleet works out the same active member.
        tunnel = self.sessions.get(member)
        if tunnel is None or not len(tunnel.table):  # the tunnel is up once it forwards
            return False
        return self._states.get(member.lower()) == "approved"

    def _update(self, pair: Pair) -> None:
        key = pair.name.lower()
        found = active_member(pair, self._online(pair.master), self._online(pair.clone))
        now = None if isinstance(found, Refusal) else found
        before = self._active.get(key)
        self._active[key] = now
        if now != before:
            detail = f"from {before or 'none'} to {now or 'none'}"
            log.info("pair {pair}: active member {detail}", pair=pair.name, detail=detail)
            # Audited once for the fleet: by the hub holding the new active member
            # (or, when none is left, the one that listened on the pair's ports).
            if (self.sessions.local(now) is not None if now is not None
                    else bool(self._listening.get(key))):
                self.sessions.calls.write(Registry.audit, "hub", "pair-switch", pair.name,
                                          detail)
        self._sync_ports(pair, now)

    def _sync_ports(self, pair: Pair, active: str | None) -> None:
        key = pair.name.lower()
        if key in self._rebinding:
            return  # done once the old listeners are closed
        if self._public.get(key, pair.public) != pair.public:
            # Access switched: close every port, then listen again on the new interface.
            self._rebinding.add(key)
            self._public[key] = pair.public
            stops = self._stop_all(key)

            def again(_: object) -> None:
                self._rebinding.discard(key)
                current = self._all().get(key)
                if current is not None:
                    self._update(current)

            stops.addCallback(again)  # may run at once: the stops may be done
            return
        self._public[key] = pair.public
        # The pair's ports listen on the hub holding its active member only.
        tunnel = None if active is None else self.sessions.local(active)
        wanted = set() if tunnel is None else {f.service for f in tunnel.table}
        listening = self._listening.setdefault(key, {})
        for service in sorted(set(listening) - wanted):
            port, listener = listening.pop(service)
            self._close(key, service, listener)
            self.sessions.calls.write(Registry.set_lease_active, pair.name, service, False)
            log.info("pair {pair}: port {port} ({service}) closed", pair=pair.name,
                     port=port, service=service)
        for service in sorted(wanted - set(listening)):
            if (key, service) not in self._closing and (key, service) not in self._leasing:
                self._listen(pair, service, listening, set())

    def _close(self, key: str, service: str, listener: PortListener) -> defer.Deferred[None]:
        def closed(_: object) -> None:
            if self._closing.get((key, service)) is closing:
                del self._closing[(key, service)]
                pair = self._all().get(key)
                if pair is not None:
                    self._sync_ports(pair, self._active.get(key))

        closing = listener.stop()
        if not closing.called:
            self._closing[(key, service)] = closing
            closing.addCallback(closed)
        return closing

    def _listen(self, pair: Pair, service: str, listening: dict[str, tuple[int, PortListener]],
                avoid: set[int], attempt: int = 0) -> None:
        """Lease the pair's port for `service` (in the registry thread), then listen."""
        sessions = self.sessions
        key = pair.name.lower()
        if attempt >= BIND_ATTEMPTS:
            log.error("pair {pair}: no usable port for {service}", pair=pair.name,
                      service=service)
            return
        self._leasing.add((key, service))

        def failed(f: Failure) -> None:
            self._leasing.discard((key, service))
            f.trap(PortsExhausted, NotFound)
            log.error("pair {pair}: no port for {service}: {why}", pair=pair.name,
                      service=service, why=f.getErrorMessage())

        def leased(got: tuple[int, bool]) -> None:
            self._leasing.discard((key, service))
            port = got[0]
            if self._listening.get(key) is not listening or service in listening:
                return  # the pair was deleted or its ports redone meanwhile
            interface = sessions.public_interface if pair.public else LOOPBACK
            try:
                listener = PortListener((sessions.listener or sessions.reactor).listenTCP(
                    port, PairListener(self, pair.name, service), interface=interface))
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) != errno.EADDRINUSE:
                    log.error("pair {pair}: cannot listen on {port}: {why}", pair=pair.name,
                              port=port, why=str(e.socketError))
                    return
                sessions.busy_ports.found(port, sessions.clock.seconds())
                avoid.add(port)
                self._listen(pair, service, listening, avoid, attempt + 1)
                return
            listening[service] = (port, listener)
            sessions.calls.write(Registry.set_lease_active, pair.name, service, True)
            log.info("pair {pair}: {service} on {iface}:{port}", pair=pair.name,
                     service=service, iface=interface, port=port)
            current = self._all().get(key)
            if current is not None:  # the active member may have changed meanwhile
                self._sync_ports(current, self._active.get(key))

        sessions.calls.call(Registry.lease, pair.name, service, sessions.port_low,
                            sessions.port_high, frozenset(avoid),
                            sessions.busy_ports.recent(sessions.clock.seconds())
                            ).addCallbacks(leased, failed)

    def _stop_all(self, key: str) -> defer.Deferred[None]:
        listening = self._listening.pop(key, {})
        return defer.gatherResults([self._close(key, service, listener)
                                    for service, (_, listener) in listening.items()]
                                   ).addCallback(lambda _: None)
