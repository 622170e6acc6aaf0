"""The hub's lifecycle services: what starts and stops with it, in order.

Binding the SSH listener (a taken port stops start-up with one line), the port
keeper, the registry thread (stopped last, once clients are gone and its queue
has run), the goodbye to clients, the start-up report and the open-file limit.
`hub.app.service` puts them in the service tree.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hub.access.auth import CALLHOME_PASSWORD
from hub.access.server import HubSSHFactory
from hub.store.offthread import RegistryThread
from hub.store.registry import Registry
from hub.tunnel.keeper import PortKeeper

log = Logger()


class ListenerService(service.Service):
    """Binds the SSH endpoint; a taken port stops start-up with one clear line."""

    def __init__(self, description: str, endpoint: str, factory: Any, reactor: Any,
                 on_listening: Any = None) -> None:
        self.on_listening = on_listening
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        ep = strports.service(self.endpoint, self.factory, reactor=self.reactor)
        ep._raiseSynchronously = True
        try:
            ep.privilegedStartService()
        except (ierror.CannotListenError, OSError, ValueError, ImportError) as e:
            raise SystemExit(f"callhomehub: cannot listen on {self.endpoint} "
                             f"({self.description}): {e}") from None
        self._ep: Any = ep
        waiting: Any = ep._waitingForPort
        waiting.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        addr = port.getHost()
        if hasattr(addr, "port"):
            log.info("callhomehub {what} listening on {host}:{port}", what=self.description,
                     host=addr.host, port=addr.port)
        else:
            log.info("callhomehub {what} listening on {path}", what=self.description,
                     path=addr.name.decode() if isinstance(addr.name, bytes) else addr.name)
        if self.on_listening is not None:
            self.on_listening(port)
        return port

    def stopService(self) -> Any:
        service.Service.stopService(self)
        return self._ep.stopService()


class PortKeeperService(service.Service):
    """Starts the port keeper with the hub (after twistd has daemonised) and
    stops it last: its ports close with it."""

    def __init__(self, keeper: PortKeeper) -> None:
        self.keeper = keeper

    def startService(self) -> None:
        service.Service.startService(self)
        self.keeper.start()

    def stopService(self) -> Any:
        self.keeper.stop()
        return service.Service.stopService(self)


class FlushOnStop(service.Service):
    """Stores results still pending in this reactor turn when the hub stops."""

    def __init__(self, flush: Any) -> None:
        self.flush = flush

    def stopService(self) -> Any:
        self.flush()
        return service.Service.stopService(self)


class DisconnectOnStop(service.Service):
    """When the hub stops, clients hear why (SSH_MSG_DISCONNECT) instead of a dropped
    TCP connection; stopping waits for them, at most `grace` seconds."""

    def __init__(self, factory: HubSSHFactory, grace: float = 2.0) -> None:
        self.factory = factory
        self.grace = grace
        self.stopping: defer.Deferred[Any] | None = None  # the clients gone (or grace over)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.stopping = self.factory.disconnect_all("the hub is shutting down", self.grace)
        return self.stopping


class RegistryStop(service.Service):
    """Runs the registry thread with the hub and stops it last: once the SSH clients
    are disconnected (their nodes' going offline is queued) and its queue has run."""

    def __init__(self, calls: RegistryThread, disconnect: DisconnectOnStop,
                 clock: IReactorTime) -> None:
        self.calls = calls
        self.disconnect = disconnect
        self.clock = clock

    def startService(self) -> None:
        service.Service.startService(self)
        self.calls.startService()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        first = self.disconnect.stopping
        if first is None:
            return self.calls.stopService()
        after: defer.Deferred[None] = defer.Deferred()

        def stop(result: object) -> object:
            # Next turn: the last connection is counted gone before its avatar logs out.
            self.clock.callLater(0, lambda: self.calls.stopService().chainDeferred(after))
            return result

        first.addBoth(stop)
        return after


class StartupReport(service.Service):
    """Says at start which state the hub serves: where, how many nodes and operators,
    and whether devices can register at all (no Call Home Password: they cannot)."""

    def __init__(self, data: str, registry: Registry) -> None:
        self.data = data
        self.registry = registry

    def startService(self) -> None:
        service.Service.startService(self)
        nodes = self.registry.nodes()
        approved = sum(1 for n in nodes if n.state == "approved")
        has_password = self.registry.setting(CALLHOME_PASSWORD) is not None
        log.info("data directory {data}: {n} nodes ({approved} approved), {users} operators, "
                 "Call Home Password {password}", data=os.path.abspath(self.data), n=len(nodes),
                 approved=approved, users=len(self.registry.users()),
                 password="set" if has_password else "not set")
        if not has_password:
            log.warn("no Call Home Password is set: new devices cannot register; set one with "
                     "callhomehub --data {data} callhome-password", data=self.data)


# Descriptors the hub holds whatever the tunnels: log, registry (db, WAL, shm),
# epoll, the reactor's waker, listeners, the control socket, a few in flight.
FD_RESERVE = 64
# And what forward ports leave free on top, for SSH logins (hub.tunnel.descriptors).
LOGIN_FD_RESERVE = 128


def raise_open_file_limit(getrlimit: Any = resource.getrlimit,
                          setrlimit: Any = resource.setrlimit) -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one, as a daemon that holds
    a socket per device must (a default soft limit of 1024 would stop the hub
    at about 480 tunnels); the (soft, hard) limits now in force."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard_cap = 1 << 20
    else:
        hard_cap = hard
    if soft != resource.RLIM_INFINITY and soft < hard_cap:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (hard_cap, hard))
            soft = hard_cap
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-file limit from {soft} to {hard}: {e}",
                     soft=soft, hard=hard_cap, e=e)
    return soft, hard


class OpenFileLimit(service.Service):
    """At start-up: raise the open-file limit and say how many tunnels it
    allows (each holds two descriptors: the device's connection and its
    forward's listening socket; one with the port keeper, which holds the
    listeners under its own limit)."""

    def __init__(self, raise_limit: Any = raise_open_file_limit,
                 port_keeper: bool = False) -> None:
        self.raise_limit = raise_limit
        self.per_tunnel = 1 if port_keeper else 2

    def startService(self) -> None:
        service.Service.startService(self)
        soft, _hard = self.raise_limit()
        if soft == resource.RLIM_INFINITY:
            return
        tunnels = max(0, (soft - FD_RESERVE) // self.per_tunnel)
        emit = log.warn if tunnels < 1000 else log.info
        emit("open-file limit {soft}: room for about {tunnels} device tunnels"
             "{advice}", soft=soft, tunnels=tunnels,
             advice="" if tunnels >= 1000 else
             " (raise it, e.g. LimitNOFILE=65536 in the systemd unit)")
