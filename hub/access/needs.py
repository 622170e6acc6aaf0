"""What the SSH avatars are given: narrow, typed views of the running hub.

The registrar and the gateway see only what they use (enrollment, live tunnels,
grants, the monitoring intake, the management key), each typed by a Protocol
that the real part (the registry, `LiveSessions`, `NetconfSessions`,
`Monitoring`) satisfies and a test can stand in for. `hub.app.context.Hub`
builds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from attrs import frozen
from twisted.conch.ssh import keys
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet.interfaces import IReactorTime

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from hub.access.recordings import Recordings
    from hub.rules.logins import OperatorLogin
    from hub.rules.pairs import Pair
    from hub.ssh.usercerts import DeviceIdentity
    from hub.store.registry import Node, User
    from hub.tunnel.live import NodeTunnel


class Enrollment(Protocol):
    """Records a device's key as a (pending) node."""

    def register(self, name: str, key_blob: bytes, fingerprint: str,
                 actor: str) -> Deferred[tuple[Node, bool]]: ...


class Tunnels(Protocol):
    """The live call-home tunnel of each node."""

    def join(self, node: str, conn: Any, peer: str) -> None: ...

    def leave(self, node: str, conn: Any) -> None: ...

    def attach(self, node: str, conn: Any, peer: str, record: Node | None = None,
               read_at: int | None = None) -> Deferred[NodeTunnel | None]: ...

    def detach(self, tunnel: NodeTunnel) -> None: ...

    def get(self, node: str) -> NodeTunnel | None: ...


class NetconfLink(Protocol):
    """A NETCONF node's call-home session: the SSH connection to open channels on."""

    @property
    def conn(self) -> Any: ...


class NetconfLinks(Protocol):
    def get(self, node: str) -> NetconfLink | None: ...


class Grants(Protocol):
    """What the gateway reads (operators, their grants, nodes) and writes (the audit log)."""

    def user(self, name: str) -> User: ...

    def node(self, name: str) -> Node: ...

    def nodes(self) -> list[Node]: ...

    def pair(self, name: str) -> Pair | None: ...

    def pairs(self) -> list[Pair]: ...

    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None: ...


class GrantsSource(Protocol):
    """Where the gateway reads grants (a snapshot per operator action, read off the
    reactor: `hub.access.grants`) and writes the audit log."""

    def snapshot(self, user: str, names: tuple[str, ...] = (),
                 every_node: bool = False) -> Deferred[Grants]: ...

    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None: ...


class Operators(Protocol):
    """The live operator connections (`hub.access.operators.LiveOperators`)."""

    def add(self, operator: Any) -> None: ...

    def discard(self, operator: Any) -> None: ...


class WebLinks(Protocol):
    """One-time web console sign-in URLs (`ssh alice@hub weblink`), from the web core."""

    def issue(self, login: OperatorLogin, arrived_at: str) -> str:
        """A new URL signing `login` in; `arrived_at` is the address the operator's
        SSH connection reached (the URL's host unless the hub has --web-url)."""


# Builds the in-tunnel NSCA intake channel: (node, actor, window, max packet) -> channel.
IntakeFactory = Callable[[str, str, int, int], SSHChannel]


@frozen
class RegistrarNeeds:
    """What the registrar user (`cms`) may touch."""

    user: str                   # the registrar user's name (`cms`)
    enrollment: Enrollment
    mgmt_public_line: str       # what a registering device is told to authorize
    tunnels: Tunnels
    intake: IntakeFactory | None
    clock: IReactorTime


@frozen
class GatewayNeeds:
    """What the console gateway and jump host may touch."""

    grants: GrantsSource
    tunnels: Tunnels
    netconf: NetconfLinks | None
    mgmt_key: keys.Key | DeviceIdentity  # the hub's identity when it logs in to a device
    clock: IReactorTime
    operators: Operators | None = None  # where a login registers to be re-checked
    weblinks: WebLinks | None = None    # None: the web console is off
    recordings: Recordings | None = None  # the sessions table and recordings; None: off
