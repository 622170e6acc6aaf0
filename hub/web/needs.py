"""What the web console is given: a narrow, typed view of the running hub.

Built by `hub.app.context.Hub.web_needs`; tests build it from a registry and fakes.
The registry is reached through `calls` only: pages answer once their reads
(one call per page) have come back from the registry thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from attrs import frozen
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource

from hub.access.needs import GatewayNeeds
from hub.store.offthread import RegistryCalls
from hub.web.sessions import SessionStore
from hub.web.weblinks import WebLinks

if TYPE_CHECKING:
    from hub.access.reach import OperatorReach
    from hub.tunnel.live import NodeTunnel


class LiveTunnels(Protocol):
    def get(self, node: str) -> NodeTunnel | None: ...


class PasswordChecks(Protocol):
    """The SSH server's bcrypt budget (`hub.access.gatekeeper.PasswordBudget`)."""

    def reserve(self, source: str) -> float | None: ...

    def refund(self, source: str) -> None: ...


class Backoff(Protocol):
    """Per-source back-off after failed passwords (`hub.access.auth.PasswordBackoff`)."""

    def delay(self, source: str) -> float: ...

    def failed(self, source: str) -> None: ...


# What the router mounts at /nodes/NAME/terminal and /nodes/NAME/web/: built for
# the signed-in operator's reach and the node name.
NodeResourceFactory = Callable[["OperatorReach", str], IResource]


@frozen
class WebNeeds:
    # The registry, reached only through the hub's registry thread: every read
    # and write the console makes runs there, none on the reactor.
    calls: RegistryCalls
    tunnels: LiveTunnels
    gateway: GatewayNeeds          # for OperatorReach: the grant check SSH uses
    # Checks an operator's password (bcrypt off the reactor): fires with an
    # OperatorLogin, fails with UnauthorizedLogin.
    check_password: Callable[[bytes, bytes], defer.Deferred[Any]]
    budget: PasswordChecks
    backoff: Backoff
    # Let the hub act on a registry change now: fires once it has (tunnels
    # rebound, sessions of a revoked node dropped).
    apply: Callable[[], defer.Deferred[None]]
    clock: IReactorTime
    sessions: SessionStore
    weblinks: WebLinks
    tls: bool                      # served over TLS (Secure cookies need it, HSTS)
    terminal: NodeResourceFactory | None = None
    proxy: NodeResourceFactory | None = None
    # After an approve: log in to the online device with the management key and pin
    # its host key, as `callhomehub approve` does (node, actor) -> what happened.
    verify: Callable[[str, str], defer.Deferred[str]] | None = None
