"""The running hub's shared parts, built once by the service wiring.

Avatars do not get this object: they get the narrow views of it that
`registrar_needs` and `gateway_needs` build (see `hub.access.needs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import Factory, define, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.grants import RegistryGrants
from hub.access.needs import GatewayNeeds, RegistrarNeeds
from hub.access.operators import LiveOperators, read_operators
from hub.app.config import HubConfig
from hub.errors import RegistryStopped
from hub.netconf.callhome import CallHomeNeeds
from hub.ssh.keys import HubKeys
from hub.ssh.usercerts import DeviceIdentity, HubUserCA
from hub.store.offthread import InlineCalls, RegistryCalls
from hub.store.registry import Node, Registry, User
from hub.store.revisions import MirrorCursor, NodeMirror, NodeUpdate
from hub.tunnel.expiry import PendingLeaseExpiry
from hub.tunnel.sessions import LiveSessions

if TYPE_CHECKING:
    from twisted.web.resource import IResource

    from hub.access.recordings import Recordings
    from hub.cluster.view import FleetView
    from hub.intake.monitoring import Monitoring
    from hub.netconf.devices import NetconfSessions
    from hub.web.needs import Backoff, PasswordChecks, WebNeeds
    from hub.web.sessions import SessionStore
    from hub.web.weblinks import WebLinks


log = Logger()


@define(eq=False)
class CallsEnrollment:
    """Device registration through the registry thread (`RegistrarNeeds.enrollment`)."""

    calls: RegistryCalls

    def register(self, name: str, key_blob: bytes, fingerprint: str,
                 actor: str) -> defer.Deferred[tuple[Node, bool]]:
        return self.calls.call(Registry.register, name, key_blob, fingerprint, actor)


@define(eq=False)
class Hub:
    config: HubConfig
    registry: Registry
    keys: HubKeys
    clock: IReactorTime
    run_in_thread: Callable[..., defer.Deferred[Any]]
    sessions: LiveSessions
    reactor: Any = None
    # The monitoring intake (results from NSCA in the tunnel or on --nsca), or None.
    monitoring: Monitoring | None = None
    # The live NETCONF call-home sessions, or None.
    netconf: NetconfSessions | None = None
    # The live operator connections, re-checked on every registry change.
    operators: LiveOperators = field(default=Factory(
        lambda self: LiveOperators(lambda: self.calls.call(read_operators)), takes_self=True))
    # Releases the leases of pending nodes that never came back, or None.
    lease_expiry: PendingLeaseExpiry | None = None
    # The web console's sign-in links and sessions, or None (--web none).
    weblinks: WebLinks | None = None
    web_sessions: SessionStore | None = None
    # The hub user CA (`callhomehub ca init`), used with [devices] login = "ca".
    user_ca: HubUserCA = field(default=Factory(
        lambda self: HubUserCA(self.config.keys_dir, self.clock.seconds), takes_self=True))
    # With peering (hub.cluster): the fleet as last read, applied with every change.
    fleet: FleetView | None = None
    # The node list as last read in the registry thread, brought up to date with
    # the nodes changed since (hub.store.revisions): what each change is applied from.
    mirror: NodeMirror = field(factory=NodeMirror)
    # Where `apply` is in the mirror's reads: each change is applied from the
    # nodes it changed, not from the whole list.
    _applied: MirrorCursor = field(factory=MirrorCursor)

    @property
    def device_identity(self) -> DeviceIdentity:
        """What the hub logs in to devices with, as the config says."""
        ca = self.user_ca if self.config.device_login == "ca" else None
        return DeviceIdentity(self.keys.mgmt, ca)
    # The operators' device sessions and their recordings, or None.
    recordings: Recordings | None = None
    # Registry calls off the reactor (hub.store.offthread): the hub's RegistryThread.
    calls: RegistryCalls = field(
        default=Factory(lambda self: InlineCalls(self.registry), takes_self=True))
    # A poll of the registry is under way (the last one has not answered yet).
    _polling: bool = False

    def sync(self) -> None:
        """Apply changes the admin CLI made to the registry (polled, see REGISTRY_POLL):
        revoked or removed nodes, operators deleted, replaced or with fewer grants.
        The poll runs in the registry thread; a slow database skips polls, never
        stacks them."""
        if not self._polling:
            self._polling = True

            def polled(changed: bool) -> defer.Deferred[None] | None:
                return self.apply() if changed else None

            def failed(f: Failure) -> None:
                if not f.check(RegistryStopped):  # else the hub is stopping: nothing to apply
                    log.error("registry poll failed: {why}", why=f.getErrorMessage())

            def done(_: object) -> None:
                self._polling = False

            self.calls.call(Registry.changed).addCallback(polled).addErrback(
                failed).addBoth(done)
        if self.lease_expiry is not None:
            self.lease_expiry.poll()

    def apply(self) -> defer.Deferred[None]:
        """Apply a change this process made to the registry (the web console's
        approve, revoke, remove, access) at once, as `sync` applies the CLI's.
        The nodes and pairs are read in the registry thread, applied here."""
        fleet, mirror, cursor = self.fleet, self.mirror, self._applied

        def read(registry: Registry) -> tuple[Any, list[User], Any]:
            # With peering, the hubs too: the fleet view (routing, relayed ports)
            # is applied from this one read of the nodes, not read again.
            return (mirror.update(registry, cursor), registry.pairs()), registry.users(), (
                registry.hubs() if fleet is not None else None)

        def enforce(listed: tuple[tuple[NodeUpdate, Any], list[User], Any]
                    ) -> defer.Deferred[None]:
            (nodes, pairs), users, hubs = listed
            done = self.sessions.enforce((nodes, pairs))
            if fleet is not None:
                fleet.apply((hubs, nodes))
            if self.netconf is not None:
                self.netconf.enforce(nodes)
            self.operators.enforce((users, pairs))
            return done

        return self.calls.call(read).addCallback(enforce)

    def web_needs(self, budget: PasswordChecks, backoff: Backoff, tls: bool) -> WebNeeds:
        """The console's view; it shares the SSH server's bcrypt budget and back-off."""
        from twisted.cred.credentials import UsernamePassword

        from hub.access.auth import CallHomePasswordChecker
        from hub.access.reach import OperatorReach
        from hub.web.needs import WebNeeds
        from hub.web.proxy import BrowseAudit, device_web_resource
        from hub.web.terminal import terminal_resource

        assert self.weblinks is not None and self.web_sessions is not None
        checker = CallHomePasswordChecker(self.calls, self.config.registrar_user,
                                          self.run_in_thread)
        settings = self.config.web_proxy
        browse = BrowseAudit(self.clock, settings.audit_interval)

        def proxy(reach: OperatorReach, node: str) -> IResource:
            return device_web_resource(reach, node, settings=settings, clock=self.clock,
                                       browse=browse)

        return WebNeeds(
            calls=self.calls, tunnels=self.sessions, gateway=self.gateway_needs(),
            check_password=lambda name, password: checker.requestAvatarId(
                UsernamePassword(name, password)),
            budget=budget, backoff=backoff, apply=self.apply, clock=self.clock,
            sessions=self.web_sessions, weblinks=self.weblinks, tls=tls,
            terminal=terminal_resource, proxy=proxy, verify=self.verify_device)

    def verify_device(self, node: str, actor: str) -> defer.Deferred[str]:
        """Log in to an approved, online device with the management key and pin its
        host key (what `callhomehub approve` asks of the running hub)."""
        from hub.app.control import Controller

        return defer.ensureDeferred(Controller(self).verify(node, actor))

    def registrar_needs(self) -> RegistrarNeeds:
        return RegistrarNeeds(
            user=self.config.registrar_user, enrollment=CallsEnrollment(self.calls),
            mgmt_public_line=self.keys.mgmt_public_line, tunnels=self.sessions,
            intake=self.monitoring.channel_factory if self.monitoring is not None else None,
            clock=self.clock)

    def netconf_needs(self) -> CallHomeNeeds:
        config = self.config
        return CallHomeNeeds(
            registry=self.registry, mgmt_key=self.keys.mgmt, clock=self.clock,
            secrets=config.netconf_secrets, keepalive=config.keepalive,
            keepalive_count=config.keepalive_count,
            max_unauthenticated=config.limits.max_unauthenticated,
            allow=config.netconf_allow,
            unknown_per_minute=config.netconf_unknown_per_minute,
            unknown_per_minute_total=config.netconf_unknown_per_minute_total,
            calls=self.calls)

    def gateway_needs(self) -> GatewayNeeds:
        return GatewayNeeds(grants=RegistryGrants(self.calls),
                            tunnels=self.sessions, netconf=self.netconf,
                            mgmt_key=self.device_identity, clock=self.clock,
                            operators=self.operators, weblinks=self.weblinks,
                            recordings=self.recordings)
