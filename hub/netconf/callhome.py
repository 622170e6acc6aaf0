"""NETCONF call home (RFC 8071): the device dials the hub, the hub is the SSH client.

On each TCP connection to `--netconf` the hub first reads an optional Junos
`outbound-ssh` preamble (`netconf_preamble`), then runs its SSH client (the
`device_client` classes) over the same socket. The device is identified by its
host key: an unknown key allowed by `admission` (the `[netconf] allow` list or a
verified preamble HMAC) becomes a pending node of kind `netconf` (named by the
preamble's DEVICE-ID, else `netconf-` and a fingerprint prefix) and the
connection is closed until an admin approves it; any other unknown device is
refused without creating anything (so it takes no name a `register` may claim).
An approved device logs in with the management key and its session is kept up
(keepalives both ways) for operators' `netconf` subsystem channels. A new call
home replaces the old one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import Factory, field, frozen
from twisted.conch.ssh import keys, transport
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.device_client import (
    LOGIN_TIMEOUT,
    DeviceClientTransport,
    DeviceConnection,
    DeviceError,
)
from hub.errors import NameTaken, NotFound
from hub.netconf.admission import Admission
from hub.netconf.devices import PENDING, REFUSE, Decision, Found, NetconfSessions, decide, lookup
from hub.netconf.preamble import PreambleError, PreambleParser, PreambleResult, authenticate
from hub.ssh.connection import Keepalive
from hub.ssh.keys import fingerprint
from hub.store.offthread import InlineCalls, RegistryCalls
from hub.store.registry import Node, Registry
from hub.timeouts import ClockTimeout

log = Logger()



class NetconfConnection(DeviceConnection):
    """The hub's side of a call-home connection: sends keepalives, reports its end.

    The device's own keepalives are global requests that Conch's client
    answers with a failure, which OpenSSH counts as an answer."""

    def __init__(self, ready: defer.Deferred[DeviceConnection], clock: IReactorTime,
                 interval: float, count: int) -> None:
        DeviceConnection.__init__(self, ready)
        self.clock = clock
        self.interval = interval
        self.count = count
        self.on_stopped: Any = None
        self.keepalive: Keepalive | None = None

    def serviceStarted(self) -> None:
        DeviceConnection.serviceStarted(self)
        self.keepalive = Keepalive(
            self, self.clock, self.interval, self.count,
            lambda: "netconf device " + str(getattr(self.transport, "peer", "?")))

    def serviceStopped(self) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
        DeviceConnection.serviceStopped(self)
        if self.on_stopped is not None:
            callback, self.on_stopped = self.on_stopped, None
            callback()


@frozen
class CallHomeNeeds:
    """What NETCONF call home uses of the running hub."""

    registry: Registry
    mgmt_key: keys.Key          # the hub's identity when it logs in to a device
    clock: IReactorTime
    secrets: Mapping[str, str]  # Junos outbound-ssh shared secrets by device id
    keepalive: float
    keepalive_count: int
    max_unauthenticated: int    # call-home connections not logged in yet
    allow: tuple[str, ...] = ()  # globs of device names that may enrol (`[netconf] allow`)
    unknown_per_minute: int = 10        # unknown devices per source address
    unknown_per_minute_total: int = 60  # unknown devices from all addresses
    # Registry calls off the reactor (hub.store.offthread); the hub's RegistryThread.
    calls: RegistryCalls = field(
        default=Factory(lambda self: InlineCalls(self.registry), takes_self=True))


class NetconfClientTransport(DeviceClientTransport):
    """The hub's SSH client on a call-home TCP connection: identifies the device
    by its host key, then logs in with the management key (approved nodes only)."""

    def __init__(self, needs: CallHomeNeeds, peer: str, device_id: str | None,
                 vouched: bytes | None, admission: Admission) -> None:
        DeviceClientTransport.__init__(self, b"", needs.mgmt_key, None, None,
                                       defer.Deferred(), needs.clock)
        self.needs = needs
        self.admission = admission
        self.peer = peer
        self.device_id = device_id
        self.vouched = vouched  # the host key the preamble's HMAC vouched for
        self.decision = Decision(REFUSE, reason="no host key seen")
        self.node_name: str | None = None
        self.refusal: str | None = None

    def verifyHostKey(self, hostKey: bytes, fingerprint_: bytes) -> defer.Deferred[bool]:
        self.host_key = hostKey
        if self.vouched is not None and hostKey != self.vouched:
            self.decision = Decision(REFUSE, self.device_id or "", (
                f"device {self.device_id}: its SSH host key {fingerprint(hostKey)} is not "
                "the HOST-KEY its preamble vouched for"))
            return self._decided()
        vouched = self.vouched is not None

        def found(found: Found) -> defer.Deferred[bool]:
            self.decision = decide(found, hostKey, self.device_id,
                                   lambda name: self.admission.may_enroll(name, vouched))
            return self._decided()

        return self.needs.calls.call(lookup, hostKey, self.device_id).addCallback(found)

    def _decided(self) -> defer.Deferred[bool]:
        if not self.decision.known and not self.admission.spend(
                self.peer, self.needs.clock.seconds()):
            return defer.fail(self._refuse(
                f"too many unknown devices from {self.peer} (more than "
                f"{self.needs.unknown_per_minute} a minute, or "
                f"{self.needs.unknown_per_minute_total} from all addresses)",
                f"limit:{self.peer}"))
        decision = self.decision
        if decision.action == REFUSE:
            # A claim on an existing node's name is logged apart, once a minute per
            # name and address, so a flood of strangers does not hide it.
            key = ("" if decision.known else f"conflict:{decision.name}:{self.peer}"
                   if decision.conflict else f"unknown:{self.peer}")
            return defer.fail(self._refuse(decision.reason, key))
        return defer.succeed(True)

    def _refuse(self, why: str, throttle: str = "") -> DeviceError:
        refuse_logged(self.admission, self.needs.clock, self.peer, why, throttle)
        self.refusal = why
        self.failure = DeviceError(why)
        return self.failure

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if self.refusal is not None and reason == transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE:
            desc = self.refusal.encode()  # say why instead of Conch's "bad host key"
        DeviceClientTransport.sendDisconnect(self, reason, desc)

    def connectionSecure(self) -> None:
        # The host key is proven now (the exchange hash is signed): safe to record
        # (in the registry thread; the login goes on once it answered).
        calls, decision = self.needs.calls, self.decision
        assert self.host_key is not None
        host_key = self.host_key
        if decision.action == PENDING:
            fp = fingerprint(host_key)

            def registered(got: tuple[Node, bool]) -> None:
                node, created = got
                calls.write(Registry.touch, node.name)
                log.info("netconf node {node} from {peer} is pending approval (host key "
                         "{fp}){new}", node=node.name, peer=self.peer, fp=fp,
                         new=" (new)" if created else "")
                self.refusal = "pending approval"
                self.failure = DeviceError(f"node {node.name} is pending approval")
                self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION,
                                    b"pending approval on the hub")

            def taken(f: Failure) -> None:
                f.trap(NameTaken)
                self._refuse(f.getErrorMessage())
                self.sendDisconnect(transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE, b"")

            calls.call(Registry.register_netconf, decision.name, host_key, fp,
                       f"netconf:{self.peer}").addCallbacks(registered, taken).addErrback(
                self._registry_failed)
            return

        def found(node: Node) -> None:
            self.node_name = node.name
            self.user = node.device_user.encode()
            DeviceClientTransport.connectionSecure(self)

        def removed(f: Failure) -> None:
            f.trap(NotFound)
            self._refuse(f"node {decision.name} was removed")
            self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"removed on the hub")

        calls.call(Registry.node, decision.name).addCallbacks(found, removed).addErrback(
            self._registry_failed)

    def _registry_failed(self, f: Failure) -> None:
        self._refuse(f"the hub's registry failed: {f.getErrorMessage()}")
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"hub error, try again later")

    def connection_service(self) -> DeviceConnection:
        needs = self.needs
        return NetconfConnection(self.ready, needs.clock, needs.keepalive,
                                 needs.keepalive_count)


def refuse_logged(admission: Admission, clock: IReactorTime, peer: str, why: str,
                  throttle: str = "") -> None:
    """Log a refusal; refusals of unknown devices (`throttle`: the kind and address,
    "" for none) once a minute each, with the count held back since the last line."""
    held = admission.say(clock.seconds(), throttle) if throttle else 0
    if held is not None:
        log.warn("netconf call home from {peer} refused: {why}{more}", peer=peer, why=why,
                 more=f" ({held} more refused from {peer} since the last line)" if held else "")


class CallHomeProtocol(ClockTimeout, protocol.Protocol):
    """A device's TCP connection: preamble first, then the hub's SSH client on it.

    One deadline at a time (`ClockTimeout`): for the preamble or
    SSH version line, then for the SSH login."""

    transport: Any
    clock: IReactorTime

    def __init__(self, factory: CallHomeFactory) -> None:
        self.factory = factory
        self.needs = factory.needs
        self.clock = self.needs.clock
        self.client: NetconfClientTransport | None = None
        self.parser: PreambleParser | None = None
        self.peer = "?"
        self._waiting_for = ""
        self._refused = False
        # Bytes that came while the DEVICE-ID was looked up, or None.
        self._held: list[bytes] | None = None
        self._lost = False

    def connectionMade(self) -> None:
        self.peer = getattr(self.transport.getPeer(), "host", "?")
        self.parser = PreambleParser(self.clock)
        self._deadline(self.parser.timeout, "sent no SSH version or preamble")

    def _deadline(self, seconds: float | None, what: str = "") -> None:
        self._waiting_for = what
        self.setTimeout(seconds)

    def timeoutConnection(self) -> None:
        log.warn("netconf call home from {peer} {what} within {t:g} s; closing", peer=self.peer,
                 what=self._waiting_for, t=self.timeOut)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.client is not None:
            self.client.dataReceived(data)
            return
        if self._held is not None:  # its DEVICE-ID is being looked up
            self._held.append(data)
            return
        if self._refused or self.parser is None:
            return
        try:
            result = self.parser.feed(data)
            if result is None:
                return
            vouched = (authenticate(result.preamble, self.needs.secrets)
                       if result.preamble is not None else None)
        except PreambleError as e:
            self._refused = True
            self._deadline(None)
            log.warn("netconf call home from {peer} refused: {why}", peer=self.peer, why=str(e))
            self.transport.loseConnection()
            return
        self._start_client(result, vouched)

    def _start_client(self, result: PreambleResult, vouched: bytes | None) -> None:
        device_id = result.preamble.device_id if result.preamble is not None else None
        if device_id is None or self.factory.admission.may_enroll(device_id, vouched is not None):
            self._run_client(device_id, vouched, result.rest)
            return
        # SSH runs for a DEVICE-ID that may not enrol only if a node of that name
        # exists (its host key then decides): looked up in the registry thread, the
        # device's bytes meanwhile held here (the preamble deadline still runs).
        self._held = [result.rest]
        self.transport.pauseProducing()

        def known(_: Node) -> None:
            held, self._held = b"".join(self._held or []), None
            self.transport.resumeProducing()
            if not self._lost:
                self._run_client(device_id, vouched, held)

        def unknown(f: Failure) -> None:
            self._held = None
            if self._lost:
                return
            self._refused = True
            self._deadline(None)
            if f.check(NotFound):
                # Refused before the SSH key exchange: an unknown name costs no crypto.
                refuse_logged(self.factory.admission, self.clock, self.peer,
                              f"unknown device {device_id} is not on the [netconf] allow list "
                              "and sent no verified HMAC", f"unknown:{self.peer}")
            else:
                refuse_logged(self.factory.admission, self.clock, self.peer,
                              f"DEVICE-ID {device_id}: the hub's registry failed: "
                              f"{f.getErrorMessage()}")
            self.transport.loseConnection()

        self.needs.calls.call(Registry.node, device_id).addCallbacks(known, unknown)

    def _run_client(self, device_id: str | None, vouched: bytes | None, rest: bytes) -> None:
        """Run the hub's SSH client on the connection, `rest` its first bytes."""
        admission = self.factory.admission
        if device_id is not None:
            log.info("netconf call home from {peer}: DEVICE-ID {id}{hmac}", peer=self.peer,
                     id=device_id, hmac=" (HMAC verified)" if vouched else "")
        self.client = client = NetconfClientTransport(self.needs, self.peer, device_id, vouched,
                                                      admission)
        self._deadline(LOGIN_TIMEOUT, "did not complete the SSH login")
        client.ready.addCallbacks(self._online, self._failed)
        client.makeConnection(self.transport)
        if rest:
            client.dataReceived(rest)

    def _online(self, conn: DeviceConnection) -> None:
        self._deadline(None)
        self.factory.authenticated(self)
        assert self.client is not None and self.client.node_name is not None
        session = self.factory.sessions.attach(self.client.node_name, conn, self.peer)
        if isinstance(conn, NetconfConnection):
            conn.on_stopped = lambda: self.factory.sessions.detach(session)

    def _failed(self, f: Failure) -> None:
        self._deadline(None)
        client = self.client
        if client is not None and client.refusal is None:
            log.warn("netconf node {node} from {peer}: login failed: {why}",
                     node=client.node_name, peer=self.peer, why=f.getErrorMessage())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self._deadline(None)
        self.factory.authenticated(self)
        if self.client is not None:
            self.client.connectionLost(reason)


class CallHomeFactory(protocol.Factory):
    """The `--netconf` listener; bounds connections that have not logged in yet."""

    noisy = False

    def __init__(self, needs: CallHomeNeeds, sessions: NetconfSessions) -> None:
        self.needs = needs
        self.sessions = sessions
        self.unauthenticated: set[CallHomeProtocol] = set()
        self.admission = Admission(needs.allow, needs.unknown_per_minute,
                                   needs.unknown_per_minute_total)

    def buildProtocol(self, addr: Any) -> CallHomeProtocol | None:
        limit = self.needs.max_unauthenticated
        if len(self.unauthenticated) >= limit:
            log.warn("refusing netconf call home from {peer}: {n} not logged in yet",
                     peer=getattr(addr, "host", addr), n=len(self.unauthenticated))
            return None
        p = CallHomeProtocol(self)
        self.unauthenticated.add(p)
        return p

    def authenticated(self, p: CallHomeProtocol) -> None:
        self.unauthenticated.discard(p)
