"""The peer listener: other hubs of the fleet log in and ask this hub to dial its nodes.

A peer logs in as its hub id with its peer key; the key must be the one that
hub publishes in the registry, and the hub must be alive (`hub.rules.cluster`):
no secret is copied by hand, and a dead hub's key opens nothing. The only
channel offered is `dial@callhomehub` (`hub.cluster.dialwire`): this hub dials
its own tunnel of the node (`NodeTunnel.dial`) and relays both ways with the
jump host's flow control. The originating hub has checked the operator's grants
and writes the audit; this one only relays, for an authenticated peer.
"""

from __future__ import annotations

from typing import Any

from attrs import evolve, frozen
from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import connection, keys
from twisted.cred import portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hub.access.auth import USER_SIG_ALGS, verify_signature
from hub.access.gateway import JumpDeviceChannel
from hub.access.limits import Limits
from hub.access.server import HubSSHFactory
from hub.cluster.dialwire import DIAL, unpack_dial
from hub.errors import NotFound
from hub.rules.cluster import has_stopped, is_live
from hub.ssh.connection import ChannelRefused
from hub.ssh.keys import HubKeys
from hub.ssh.wire import WireError
from hub.store.hubs import HubRow
from hub.store.offthread import RegistryCalls
from hub.store.registry import Node, Registry
from hub.tunnel.relay import RelayChannel
from hub.tunnel.sessions import LiveSessions

log = Logger()

# Channels a peer hub may have open on its connection at once (operators' sessions,
# jumps and device-port connections to this hub's nodes, from all of that hub).
PEER_MAX_CHANNELS = 16384


@frozen
class PeerLogin:
    """Another hub of the fleet, logged in with its published peer key."""

    hub: str


def key_blob(line: str) -> bytes | None:
    """The public key blob of an OpenSSH public key line, or None if it is not one."""
    try:
        return keys.Key.fromString(line.encode()).blob()
    except (keys.BadKeyError, ValueError, IndexError):
        return None


@implementer(ICredentialsChecker)
class PeerKeyChecker:
    """Accepts exactly the peer keys of live hubs in the registry, each as its own hub."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, calls: RegistryCalls, clock: IReactorTime) -> None:
        self._calls = calls
        self._clock = clock

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        if credentials.algName not in USER_SIG_ALGS:
            return defer.fail(UnauthorizedLogin("signature algorithm not allowed"))
        # The hubs' rows are read in the registry thread; the login waits for them.
        return self._calls.call(Registry.hubs).addCallback(self._check, credentials)

    def _check(self, hubs: list[HubRow], credentials: Any) -> PeerLogin:
        name = credentials.username.decode("utf-8", "replace")
        row = next((h for h in hubs if h.id == name), None)
        if row is None:
            raise UnauthorizedLogin(f"no hub {name!r} in the registry")
        if key_blob(row.peer_key) != credentials.blob:
            raise UnauthorizedLogin(f"not the peer key hub {name} publishes")
        now = self._clock.seconds()
        if not is_live(row.heartbeat, now):
            raise UnauthorizedLogin(
                f"hub {name} has stopped" if has_stopped(row.heartbeat) else
                f"hub {name} is dead (last heartbeat {now - row.heartbeat:.0f} s ago)")
        verify_signature(credentials)
        return PeerLogin(row.id)


class PeerChannel(RelayChannel):
    """The peer hub's end of a relay to one of this hub's nodes."""

    # Confirmed once the device end has opened.
    relay_pending = True

    def __init__(self, node: str, **kw: Any) -> None:
        RelayChannel.__init__(self, DIAL, **kw)
        self.node = node


class PeerAvatar(ConchUser):
    """A peer hub logged in: it may dial nodes this hub holds, nothing else."""

    def __init__(self, sessions: LiveSessions, login: PeerLogin) -> None:
        ConchUser.__init__(self)
        self.sessions = sessions
        self.hub = login.hub
        self.conn: Any = None

    def logout(self) -> None:
        log.info("peer hub {hub} disconnected", hub=self.hub)

    def lookupChannel(self, channel_type: bytes, window: int, max_packet: int,
                      data: bytes) -> Any:
        if channel_type != DIAL:
            raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"channel type {channel_type.decode('ascii', 'replace')} "
                                 "is not offered to peer hubs")
        try:
            request = unpack_dial(data)
        except WireError as e:
            log.warn("peer hub {hub}: malformed dial request: {why}", hub=self.hub, why=str(e))
            raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"malformed dial request: {e}") from None
        tunnel = self.sessions.local(request.node)
        if tunnel is None:
            return self._not_held(request.node)
        peer = PeerChannel(tunnel.node, remoteWindow=window, remoteMaxPacket=max_packet)
        device = JumpDeviceChannel()
        peer.relay_peer, device.relay_peer = device, peer
        log.info("peer hub {hub}: relaying to {node} {target}", hub=self.hub, node=tunnel.node,
                 target=request.target)
        opened = tunnel.dial(request.target, device, (request.origin, request.origin_port))
        return opened.addCallback(lambda _: peer)

    def _not_held(self, node: str) -> defer.Deferred[Any]:
        """The refusal of a dial to a node not held here, in words: whether the
        node exists is read in the registry thread."""
        def known(record: Node) -> str:
            return f"node {record.name} is not connected to this hub"

        def unknown(f: Failure) -> str:
            f.trap(NotFound)
            return f"no node named {node!r}"

        def refuse(why: str) -> None:
            log.info("peer hub {hub}: dial to {node} refused: {why}", hub=self.hub,
                     node=node, why=why)
            raise ChannelRefused(connection.OPEN_CONNECT_FAILED, why)

        return self.sessions.calls.call(Registry.node, node).addCallbacks(
            known, unknown).addCallback(refuse)

    def gotGlobalRequest(self, request_type: bytes, data: bytes) -> Any:
        return 0


@implementer(portal.IRealm)
class PeerRealm:
    def __init__(self, sessions: LiveSessions) -> None:
        self.sessions = sessions

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces or not isinstance(avatar_id, PeerLogin):
            raise NotImplementedError("no such avatar")
        log.info("peer hub {hub} logged in", hub=avatar_id.hub)
        avatar = PeerAvatar(self.sessions, avatar_id)
        return IConchUser, avatar, avatar.logout


def peer_host_keys(peer_key: keys.Key) -> HubKeys:
    """The peer listener presents the peer key as its host key: peers check it
    against the key this hub publishes."""
    return HubKeys({peer_key.sshType(): peer_key}, {peer_key.sshType(): peer_key.public()},
                   peer_key)


def build_peer_factory(calls: RegistryCalls, sessions: LiveSessions, peer_key: keys.Key,
                       clock: IReactorTime, limits: Limits, keepalive: float,
                       keepalive_count: int) -> HubSSHFactory:
    """The peer listener's factory (the SSH server's transport, limits and keepalives)."""
    peer_portal = portal.Portal(PeerRealm(sessions), [PeerKeyChecker(calls, clock)])
    # One connection carries every cross-hub channel of a peer: not an operator's cap.
    limits = evolve(limits, max_channels=PEER_MAX_CHANNELS)
    return HubSSHFactory(peer_portal, peer_host_keys(peer_key), clock, limits, keepalive,
                         keepalive_count)


