"""`twistd callhomehub`: command-line options and the service tree.

Everything that touches the real reactor is wired here and nowhere else.
"""

from __future__ import annotations

import os
from typing import Any

from attrs import evolve
from twisted.application import internet, service
from twisted.conch.interfaces import IConchUser
from twisted.cred import portal
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from hub import __version__
from hub.access.auth import CallHomePasswordChecker, DeviceKeyChecker
from hub.access.certs import CertificateChecker
from hub.access.gateway import OperatorAvatar
from hub.access.needs import GatewayNeeds, RegistrarNeeds
from hub.access.recordings import PRUNE_INTERVAL, open_recordings
from hub.access.registrar import RegistrarAvatar
from hub.access.server import HubSSHFactory
from hub.app.config import HubConfig, as_worker, build_config
from hub.app.console import build_web, web_prune_service
from hub.app.context import Hub
from hub.app.control import ControlFactory, control_endpoint
from hub.app.datalock import DataLock, DataLockService
from hub.app.lifecycle import (
    FD_RESERVE,
    LOGIN_FD_RESERVE,
    DisconnectOnStop,
    FlushOnStop,
    ListenerService,
    OpenFileLimit,
    PortKeeperService,
    RegistryStop,
    StartupReport,
)
from hub.app.logs import HubService, parse_level
from hub.app.peering import add_peering
from hub.app.sharedport import SharedListenerService, parse_tcp_listen
from hub.app.workers import WorkerSupervisor, reactor_spawn, worker_arguments
from hub.errors import HubError
from hub.intake.commandfile import CommandFileWriter
from hub.intake.monitoring import Monitoring
from hub.netconf.callhome import CallHomeFactory
from hub.netconf.devices import NetconfSessions
from hub.rules.admission import networks
from hub.rules.logins import DeviceLogin, OperatorLogin
from hub.ssh.hostcerts import present_host_certificate
from hub.ssh.keys import fingerprint, load_hub_keys
from hub.store.offthread import InlineCalls, RegistryCalls, RegistryThread
from hub.store.registry import Registry
from hub.tunnel.descriptors import DescriptorReserve
from hub.tunnel.expiry import PendingLeaseExpiry
from hub.tunnel.keeper import PortKeeper
from hub.tunnel.sessions import LiveSessions
from hub.web.metrics import metrics_registry, metrics_site

log = Logger()

# How often the hub looks for the admin CLI's changes (`PRAGMA data_version`, a
# read of shared memory, microseconds): a revoked node or deleted operator is cut
# off within this plus the CLI's own run time (about 0.4 s).
REGISTRY_POLL = 0.25


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the callhomehub SSH hub. See docs/operator-guide.md."
    optFlags = [
        ["port-keeper", None, "hold forward listeners in a helper process (for an "
         "open-file limit that caps the hub below 2 descriptors per tunnel)"],
    ]
    optParameters = [
        ["data", None, None, "state directory (hub.sqlite3, keys/); default "
         "$CALLHOMEHUB_DATA, else ."],
        ["ssh", None, "tcp:22", "SSH listener endpoint"],
        ["port-range", None, "49152-65535", "per-device port range LOW-HIGH"],
        ["public-interface", None, "0.0.0.0", "address public device ports bind to"],
        ["keepalive", None, "15", "seconds between server keepalives (0 disables)"],
        ["keepalive-count", None, "3", "unanswered keepalives before a tunnel is dropped"],
        ["nsca", None, None, "optional plain-TCP NSCA listener endpoint"],
        ["command-file", None, None, "Nagios/Icinga external command file"],
        ["netconf", None, None, "RFC 8071 NETCONF call-home listener endpoint"],
        ["config", None, None, "config file (default DATA/callhomehub.toml if present)"],
        ["log-level", None, "info", "lowest level logged: debug, info, warn, error, critical"],
        ["metrics", None, "tcp:9721:interface=127.0.0.1", "Prometheus /metrics listener "
         "endpoint, or none"],
        ["web", None, "ssl:443", "web console endpoint (ssl:PORT uses DATA/keys/web.crt, "
         "made on first start; tcp:... behind a proxy; none: off)"],
        ["web-url", None, None, "the console's URL as operators reach it (weblink); "
         "default: the address they reached the hub at"],
        ["peer", None, None, "peer listener endpoint for other hubs on the same registry "
         "(docs/cluster.md); default none: a single hub"],
        ["workers", None, None, "hub processes sharing the SSH port (tcp: endpoints); "
         "default: the number of cores"],
        ["registry", None, None, "a PostgreSQL registry, postgresql://USER@HOST/DATABASE; "
         "default $CALLHOMEHUB_REGISTRY, else DATA/hub.sqlite3"],
    ]

    def opt_version(self) -> None:
        """Print the version and exit"""
        print(f"callhomehub {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.log_level = parse_level(self["log-level"])
            self.hub_config = build_config(self)
            prepare_data_dir(self.hub_config)
        except HubError as e:
            # One line, no usage dump: the option is fine, its value is not.
            raise SystemExit(f"callhomehub: {e}") from None


def prepare_data_dir(config: HubConfig) -> None:
    """Create the data directory if needed; a clear error if it is unusable."""
    try:
        os.makedirs(config.data, exist_ok=True)
    except OSError as e:
        raise HubError(f"--data {config.data}: cannot create: {e.strerror}") from None
    if not os.access(config.data, os.R_OK | os.W_OK | os.X_OK):
        raise HubError(f"--data {config.data}: not readable and writable by this user")


@implementer(portal.IRealm)
class HubRealm:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.peer = "?"
        # Built at the first login (the hub is wired by then), shared by every avatar.
        self._registrar: RegistrarNeeds | None = None
        self._gateway: GatewayNeeds | None = None

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("no such avatar")
        avatar: RegistrarAvatar | OperatorAvatar
        # The peer is read lazily: the avatar outlives this call.
        if isinstance(avatar_id, DeviceLogin):
            if self._registrar is None:
                self._registrar = self.hub.registrar_needs()
            avatar = RegistrarAvatar(self._registrar, avatar_id, lambda: self._peer_of(avatar))
        elif isinstance(avatar_id, OperatorLogin):
            if self._gateway is None:
                self._gateway = self.hub.gateway_needs()
            avatar = OperatorAvatar(self._gateway, avatar_id, lambda: self._peer_of(avatar))
        else:
            raise NotImplementedError("no such avatar")
        return IConchUser, avatar, avatar.logout

    @staticmethod
    def _peer_of(avatar: Any) -> str:
        conn = avatar.conn
        return getattr(getattr(conn, "transport", None), "peer", "?")


def build_hub(config: HubConfig, reactor: Any, reset_online: bool = True,
              registry_type: type[Registry] = Registry) -> Hub:
    from twisted.internet.threads import deferToThreadPool

    clock: IReactorTime = reactor
    registry = open_registry(config, clock, registry_type)
    if reset_online or config.peer is not None:
        # Not by a worker without peering: worker 0 did, and the others' nodes
        # are online. With hub ids each process clears only its own claims.
        registry.reset_online()
    hub_keys = load_hub_keys(config.keys_dir)
    hub_keys = evolve(hub_keys, host_certificate=present_host_certificate(
        config.keys_dir, hub_keys.host_private[b"ssh-ed25519"], clock.seconds()))

    def run_in_thread(f: Any, *a: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)

    sessions = LiveSessions(registry, clock, reactor, config.port_low, config.port_high,
                            config.public_interface, caps=config.limits.forward_caps())
    sessions.descriptors = DescriptorReserve(clock, FD_RESERVE + LOGIN_FD_RESERVE)
    sessions.hub_id = registry.hub_id
    if config.port_keeper:
        sessions.listener = PortKeeper(reactor, on_lost=sessions.drop_all,
                                       on_port_lost=sessions.port_lost)
    hub = Hub(config, registry, hub_keys, clock, run_in_thread, sessions, reactor)
    hub.calls = sessions.calls = registry_calls(config, registry, reactor, registry_type)
    command_file = (CommandFileWriter(config.command_file, clock)
                    if config.command_file else None)
    hub.monitoring = Monitoring(registry, config.nsca, clock, command_file, calls=hub.calls)
    hub.netconf = NetconfSessions(registry, clock, calls=hub.calls)
    hub.lease_expiry = PendingLeaseExpiry(registry, clock, config.limits.pending_lease_expiry,
                                          calls=hub.calls)
    hub.recordings = open_recordings(
        registry, config.recordings_dir if config.recordings_enabled else None, clock,
        run_in_thread, config.recordings, calls=hub.calls)
    return hub


def open_registry(config: HubConfig, clock: IReactorTime,
                  registry_type: type[Registry] = Registry) -> Registry:
    """A connection to the hub's registry, as this hub (its hub id when it peers:
    several hubs reset and mark online only the nodes they hold)."""
    registry = registry_type(config.registry, now=clock.seconds)
    if config.peer is not None:
        registry.hub_id = config.cluster_id
    return registry


def registry_calls(config: HubConfig, registry: Registry, reactor: Any,
                   registry_type: type[Registry] = Registry) -> RegistryCalls:
    """The hub's registry calls: a thread with its own connection, or, on a reactor
    that takes no calls from threads (tests' MemoryReactorClock), inline on `registry`."""
    clock: IReactorTime = reactor
    if not IReactorFromThreads.providedBy(reactor):
        return InlineCalls(registry)
    def open_in_thread() -> Registry:
        opened = open_registry(config, clock, registry_type)
        # One histogram of the hub's transactions (/metrics), most of them the thread's.
        opened.latency = registry.latency
        return opened

    return RegistryThread(open_in_thread, reactor, clock)


def build_ssh_factory(hub: Hub) -> HubSSHFactory:
    """The SSH listener's factory: portal, checkers and limits from the hub's config."""
    config = hub.config
    hub_portal = portal.Portal(HubRealm(hub), [
        CallHomePasswordChecker(hub.calls, config.registrar_user, hub.run_in_thread),
        DeviceKeyChecker(hub.calls, config.registrar_user,
                         changes=lambda: hub.sessions.applied),
        CertificateChecker(hub.calls, config.trusted_ca_keys, hub.clock),
    ])
    if config.trusted_ca_keys:
        log.info("operators may log in with certificates from {n} trusted user CA(s): {cas}",
                 n=len(config.trusted_ca_keys),
                 cas=", ".join(fingerprint(ca) for ca in config.trusted_ca_keys))
    factory = HubSSHFactory(hub_portal, hub.keys, hub.clock, config.limits, config.keepalive,
                            config.keepalive_count, transport_policy=config.transport)
    def audit(actor: str, action: str, target: str, detail: str = "") -> None:
        hub.calls.write(Registry.audit, actor, action, target, detail)

    factory.audit = audit  # denied logins are audited too (queued, off the reactor)
    if config.proxy_protocol_from:
        factory.proxy_from = networks(config.proxy_protocol_from)
        log.info("SSH connections from {nets} start with a PROXY protocol header",
                 nets=", ".join(config.proxy_protocol_from))
    return factory


def makeService(options: Any, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config: HubConfig = getattr(options, "hub_config", None) or build_config(options)
    if config.workers > 1:
        config = as_worker(config, 0)
    try:
        lock = DataLock.take(config.data)
    except HubError as e:
        raise SystemExit(f"callhomehub: {e}") from None
    try:
        hub = build_hub(config, reactor)
    except HubError as e:
        lock.release()
        raise SystemExit(f"callhomehub: {e}") from None
    factory = build_ssh_factory(hub)
    level = getattr(options, "log_level", None) or parse_level("info")
    top = HubService(level, getattr(options, "parent", None))
    top.hub = hub  # type: ignore[attr-defined]
    DataLockService(lock).setServiceParent(top)
    disconnect = DisconnectOnStop(factory)  # stopped before the listener
    if isinstance(hub.calls, RegistryThread):
        RegistryStop(hub.calls, disconnect, hub.clock).setServiceParent(top)
    StartupReport(config.data, hub.registry).setServiceParent(top)
    OpenFileLimit(port_keeper=config.port_keeper).setServiceParent(top)
    if hub.sessions.listener is not None:
        PortKeeperService(hub.sessions.listener).setServiceParent(top)
    workers = None
    if config.workers > 1:
        workers = add_workers(top, options, config, factory, reactor)
    else:
        ListenerService("SSH", config.ssh, factory, reactor).setServiceParent(top)
    disconnect.setServiceParent(top)
    ListenerService("control socket", control_endpoint(config.data), ControlFactory(hub),
                    reactor).setServiceParent(top)
    if config.nsca_endpoint and hub.monitoring is not None:
        nsca = hub.monitoring.tcp_factory(hub.sessions.descriptors)
        ListenerService("NSCA", config.nsca_endpoint, nsca, reactor).setServiceParent(top)
    netconf = hub.netconf
    assert netconf is not None  # build_hub made it
    if config.netconf_endpoint:
        ListenerService("NETCONF", config.netconf_endpoint, CallHomeFactory(
            hub.netconf_needs(), netconf), reactor).setServiceParent(top)
    if config.metrics is not None:
        metrics = metrics_registry(hub.registry, hub.sessions, factory, hub.monitoring.counts
                                   if hub.monitoring is not None else None, calls=hub.calls,
                                   workers=workers)
        ListenerService("metrics", config.metrics, metrics_site(metrics),
                        reactor).setServiceParent(top)
    if hub.monitoring is not None:
        FlushOnStop(hub.monitoring.flush).setServiceParent(top)
    web = build_web(hub, factory)
    if web is not None:
        endpoint, site, listener = web
        ListenerService("web", endpoint, site, reactor,
                        on_listening=listener.listening).setServiceParent(top)
        web_prune_service(hub, reactor).setServiceParent(top)
    if hub.recordings is not None:
        # Oldest recordings pruned at start, then every PRUNE_INTERVAL.
        prune = internet.TimerService(PRUNE_INTERVAL, hub.recordings.prune)
        prune.clock = reactor
        prune.setServiceParent(top)
    add_peering(top, hub, reactor, ListenerService)
    poll = internet.TimerService(REGISTRY_POLL, hub.sync)
    poll.clock = reactor
    poll.setServiceParent(top)
    return top


def add_workers(top: service.MultiService, options: Any, config: HubConfig,
                factory: HubSSHFactory, reactor: Any) -> WorkerSupervisor:
    """`--workers N`, N > 1: this process's SSH listener is shared, and workers
    1..N-1 (hub.app.workers) start after it is bound, on the port it bound."""
    listen = parse_tcp_listen(config.ssh)
    assert listen is not None  # build_config refused other endpoints
    shared = SharedListenerService("SSH", listen, factory, reactor)
    shared.setServiceParent(top)
    log.info("{n} workers: this process is worker 0", n=config.workers)
    supervisor = WorkerSupervisor(config.workers, lambda index: worker_arguments(
        options, Options.optParameters, Options.optFlags, index, shared.endpoint()),
        reactor_spawn(reactor), reactor)
    supervisor.setServiceParent(top)
    return supervisor
