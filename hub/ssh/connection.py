"""The SSH connection service of the hub's server side.

Conch's `SSHConnection` answers channel opens and global requests on the spot
and adjusts windows as soon as data arrives, whatever the consumer does. Here:
channel opens may be refused with a reason or answered later (a Deferred);
global requests may be answered later too, replies kept in request order;
channels that say `manages_window = True` send their own window adjusts once
their consumer has taken the data (real backpressure); and server keepalives
drop a peer that stops answering.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection, transport
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hub.ssh.loglevel import GatedLogger
from hub.ssh.sink import IChannelDataViews

log = Logger()

_DATA_HEAD = struct.Struct(">2L")
_UINT32 = struct.Struct(">L")
_OPEN_HEAD = struct.Struct(">3L")  # sender channel, initial window, maximum packet


class ChannelRefused(Exception):
    """A channel open the hub declines; `reason` is an SSH OPEN_* code."""

    def __init__(self, reason: int, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


@implementer(IChannelDataViews)
class WindowedChannelsMixin:
    """For SSHConnection subclasses (server and client side): channels that say
    `manages_window = True` get their data without Conch's automatic window
    adjust, and grant window themselves once their consumer took the data."""

    # Conch's per-request debug lines, dropped before they are built.
    _log = GatedLogger()

    channels: dict[int, Any]
    channelsToRemoteChannel: dict[Any, int]
    localToRemoteChannel: dict[int, int]
    localChannelID: int
    transport: Any
    getChannel: Any  # from SSHConnection

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        local, length = _DATA_HEAD.unpack_from(packet)
        channel = self.channels.get(local)
        if channel is None or not getattr(channel, "manages_window", False):
            super().ssh_CHANNEL_DATA(packet)  # type: ignore[misc]
            return
        if self._take_window(channel, length):
            channel.dataReceived(packet[8:8 + length])

    def channelDataView(self, payload: memoryview) -> bool:
        """CHANNEL_DATA (`payload` from its message number on, valid only during
        this call) for a channel that takes `data_views`: its data goes to
        `dataReceived` as a view, with no copy. False leaves the packet to
        `ssh_CHANNEL_DATA` (other channels, malformed packets)."""
        if len(payload) < 9:
            return False
        local, length = _DATA_HEAD.unpack_from(payload, 1)
        channel = self.channels.get(local)
        if (channel is None or not getattr(channel, "data_views", False)
                or len(payload) < 9 + length):
            return False
        if self._take_window(channel, length):
            channel.dataReceived(payload[9:9 + length])
        return True

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        local, type_code, length = struct.unpack(">3L", packet[:12])
        channel = self.channels.get(local)
        if channel is None or not getattr(channel, "manages_window", False):
            super().ssh_CHANNEL_EXTENDED_DATA(packet)  # type: ignore[misc]
            return
        if self._take_window(channel, length):
            channel.extReceived(type_code, packet[12:12 + length])

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        # Conch's, less the traceback it logged for every refusal (its client
        # refuses whatever channel a server opens: the hub offers devices no
        # agent or X11 forwarding): a refusal is one line.
        channel_type, rest = common.getNS(packet)
        sender, window, max_packet = struct.unpack(">3L", rest[:12])
        try:
            channel = self.getChannel(channel_type, window, max_packet, rest[12:])
        except ConchError as e:
            text, reason = e.args if isinstance(e.args[1], int) else (e.args[1], e.args[0])
            log.info("{peer}: refused channel {type}: {text}",
                     peer=getattr(self.transport, "peer", "?"),
                     type=channel_type.decode("ascii", "replace"), text=text)
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_FAILURE,
                struct.pack(">2L", sender, reason) + common.NS(str(text).encode())
                + common.NS(b""))
            return
        self._accept_channel(channel, sender)
        channel.channelOpen(rest[12:])

    def _accept_channel(self, channel: Any, sender: int) -> None:
        """Number a channel the peer opened, pair it with the peer's number and
        confirm the open, as Conch's SSHConnection does."""
        local = self.localChannelID
        self.localChannelID += 1
        channel.id = local
        self.channels[local] = channel
        self.channelsToRemoteChannel[channel] = sender
        self.localToRemoteChannel[local] = sender
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(">4L", sender, local, channel.localWindowSize, channel.localMaxPacket)
            + channel.specificData)

    def ssh_CHANNEL_REQUEST(self, packet: bytes) -> Any:
        # Conch's, less its unhandled Deferred: a request whose data the
        # channel cannot parse (a short `exec`, `exit-status`) raised into a
        # Deferred nobody waited on when no reply was wanted, a traceback in
        # the log when it was collected.  Now the channel refuses it, in one
        # line, and the peer gets CHANNEL_FAILURE if it asked.
        local = _UINT32.unpack_from(packet)[0]
        request_type, rest = common.getNS(packet[4:])
        want_reply = rest[0]
        channel = self.channels[local]
        d = defer.maybeDeferred(channel.requestReceived, request_type, rest[1:])

        def refused(f: Failure) -> int:
            log.info("{peer}: channel {id} request {req} refused: {why}",
                     peer=getattr(self.transport, "peer", "?"), id=local,
                     req=request_type.decode("ascii", "replace"), why=f.getErrorMessage())
            return 0

        d.addErrback(refused)
        if want_reply:
            d.addCallback(self._reply_to_channel_request, local)
        return d

    def _reply_to_channel_request(self, result: object, local: int) -> None:
        if local not in self.channels or self.transport.isDisconnecting():
            return
        remote = self.localToRemoteChannel[local]
        self.transport.sendPacket(
            connection.MSG_CHANNEL_SUCCESS if result else connection.MSG_CHANNEL_FAILURE,
            _UINT32.pack(remote))

    # Open replies are only for channels this side opened and is waiting on
    # (not yet given a remote number): Conch re-opened or half-forgot a
    # channel that was open already, and its end raised KeyError.

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        self._awaiting_reply(packet)
        super().ssh_CHANNEL_OPEN_CONFIRMATION(packet)  # type: ignore[misc]

    def ssh_CHANNEL_OPEN_FAILURE(self, packet: bytes) -> None:
        self._awaiting_reply(packet)
        super().ssh_CHANNEL_OPEN_FAILURE(packet)  # type: ignore[misc]

    def _awaiting_reply(self, packet: bytes) -> None:
        channel = self.channels[_UINT32.unpack_from(packet)[0]]
        if channel in self.channelsToRemoteChannel:
            raise ValueError(f"channel {channel.id} is open already")

    # Conch ignores a reply for a channel that does not exist; OpenSSH, like
    # every other message naming one, treats it as the peer's protocol error
    # (the transport's dispatch drops the connection over the KeyError).

    def ssh_CHANNEL_SUCCESS(self, packet: bytes) -> None:
        self.channels[_UINT32.unpack_from(packet)[0]]
        super().ssh_CHANNEL_SUCCESS(packet)  # type: ignore[misc]

    def ssh_CHANNEL_FAILURE(self, packet: bytes) -> None:
        self.channels[_UINT32.unpack_from(packet)[0]]
        super().ssh_CHANNEL_FAILURE(packet)  # type: ignore[misc]

    # Conch's openChannel, sendEOF and sendClose, less their log calls: an
    # info or debug event for every forwarded connection's open and close
    # (built, timestamped and filtered out below debug) was a tenth of the
    # hub's CPU for short connections through a tunnel.

    def openChannel(self, channel: Any, extra: bytes = b"") -> None:
        local = self.localChannelID
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN,
            common.NS(channel.name)
            + _OPEN_HEAD.pack(local, channel.localWindowSize, channel.localMaxPacket) + extra)
        channel.id = local
        self.channels[local] = channel
        self.localChannelID = local + 1

    def sendEOF(self, channel: Any) -> None:
        if channel.localClosed:
            return
        self.transport.sendPacket(connection.MSG_CHANNEL_EOF,
                                  _UINT32.pack(self.channelsToRemoteChannel[channel]))

    def sendClose(self, channel: Any) -> None:
        if channel.localClosed:
            return
        self.transport.sendPacket(connection.MSG_CHANNEL_CLOSE,
                                  _UINT32.pack(self.channelsToRemoteChannel[channel]))
        channel.localClosed = True
        if channel.remoteClosed:
            self.channelClosed(channel)  # type: ignore[attr-defined]

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        # Conch's, less its debug event: a channel in bulk grants window every
        # half MiB, and the event (built, published, filtered out) cost more
        # than the packet that carries the grant.
        if channel.localClosed:
            return
        self.transport.sendPacket(
            connection.MSG_CHANNEL_WINDOW_ADJUST,
            _DATA_HEAD.pack(self.channelsToRemoteChannel[channel], bytesToAdd))
        channel.localWindowLeft += bytesToAdd

    def _take_window(self, channel: Any, length: int) -> bool:
        """Count `length` bytes against the channel's window; a peer that sends
        beyond it (or a packet over the maximum) gets the channel closed: False."""
        if length > channel.localWindowLeft or length > channel.localMaxPacket:
            log.warn("{peer}: channel {id} sent {n} bytes beyond its window; closing it",
                     peer=getattr(self.transport, "peer", "?"), id=channel.id, n=length)
            self.sendClose(channel)
            return False
        channel.localWindowLeft -= length
        return True


class Keepalive:
    """Sends `keepalive@openssh.com` every `interval` seconds on a connection and
    drops the peer once `count` in a row go unanswered (a dead peer behind NAT
    never says goodbye). Any answer counts: OpenSSH answers REQUEST_FAILURE."""

    def __init__(self, conn: Any, clock: Any, interval: float, count: int,
                 who: Callable[[], str]) -> None:
        self.conn = conn
        self.count = count
        self.missed = 0
        self._who = who
        # Told of every answer (the peer is alive): the registry's "last seen".
        self.on_answer: Callable[[], None] | None = None
        self._loop: task.LoopingCall | None = None
        if interval > 0:
            self._loop = task.LoopingCall(self._tick)
            self._loop.clock = clock
            self._loop.start(interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        ssh_transport = self.conn.transport
        if self.missed >= self.count:
            log.info("{peer}: {n} keepalives unanswered, dropping the connection",
                     peer=self._who(), n=self.missed)
            self.stop()
            # A dead peer never reads the disconnect; do not wait for it.
            ssh_transport.disconnectNow(transport.DISCONNECT_CONNECTION_LOST,
                                        b"keepalive timeout")
            return
        self.missed += 1

        def answered(_: object) -> None:
            self.missed = 0
            if self.on_answer is not None:
                self.on_answer()

        def failed(f: Failure) -> None:
            # A REQUEST_FAILURE proves the peer alive as well as a success would;
            # "Connection stopped." proves nothing.
            if isinstance(f.value, ConchError) and f.value.args[0] == "global request failed":
                answered(None)

        self.conn.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1).addCallbacks(
            answered, failed)


class PeerChannels:
    """The channels a peer opened on one connection, open or still opening,
    against two caps: session channels, and channels of any kind. Channels
    the hub opens to the peer (`forwarded-tcpip` to a device) do not count."""

    def __init__(self, max_sessions: int, max_channels: int) -> None:
        self.max_sessions = max_sessions
        self.max_channels = max_channels
        self.sessions = 0
        self._kinds: dict[object, bool] = {}  # token or channel -> is a session

    def __len__(self) -> int:
        return len(self._kinds)

    def over_limit(self, channel_type: bytes) -> str | None:
        """Why another channel of this type is refused, or None."""
        if channel_type == b"session" and self.sessions >= self.max_sessions:
            return f"too many sessions on this connection (at most {self.max_sessions})"
        if len(self._kinds) >= self.max_channels:
            return f"too many channels on this connection (at most {self.max_channels})"
        return None

    def opening(self, channel_type: bytes) -> object:
        token = object()
        self._kinds[token] = channel_type == b"session"
        self.sessions += self._kinds[token]
        return token

    def opened(self, token: object, channel: object) -> None:
        self._kinds[channel] = self._kinds.pop(token)

    def closed(self, key: object) -> None:
        self.sessions -= self._kinds.pop(key, False)


class HubConnection(WindowedChannelsMixin, connection.SSHConnection):
    """The connection service: keepalives, and channel opens that can wait or refuse."""

    transport: Any

    def serviceStarted(self) -> None:
        connection.SSHConnection.serviceStarted(self)
        hub_factory = self.transport.factory
        self._replies: list[list[Any]] = []
        limits = hub_factory.limits
        self._peer_channels = PeerChannels(limits.max_sessions, limits.max_channels)
        avatar = self.transport.avatar
        avatar.conn = self
        self.keepalive = Keepalive(self, hub_factory.clock, hub_factory.keepalive,
                                   hub_factory.keepalive_count, lambda: self.transport.peer)
        started = getattr(avatar, "connection_started", None)
        if started is not None:
            started(self)

    def serviceStopped(self) -> None:
        self.keepalive.stop()
        connection.SSHConnection.serviceStopped(self)

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channel_type, rest = common.getNS(packet)
        sender, window, max_packet = struct.unpack(">3L", rest[:12])
        data = rest[12:]
        over = self._peer_channels.over_limit(channel_type)
        if over is not None:
            self._refuse(sender, connection.OPEN_RESOURCE_SHORTAGE, over, channel_type)
            return
        try:
            result = self.transport.avatar.lookupChannel(channel_type, window, max_packet, data)
        except ChannelRefused as e:
            self._refuse(sender, e.reason, e.text, channel_type)
            return
        except ConchError as e:
            text, reason = e.args if isinstance(e.args[1], int) else (e.args[1], e.args[0])
            self._refuse(sender, reason, str(text), channel_type)
            return
        token = self._peer_channels.opening(channel_type)
        d = defer.maybeDeferred(lambda: result)
        d.addCallback(self._confirm, sender, data, token)
        d.addErrback(self._open_failed, sender, channel_type, token)

    def channelClosed(self, channel: Any) -> None:
        connection.SSHConnection.channelClosed(self, channel)
        self._peer_channels.closed(channel)

    def _confirm(self, channel: Any, sender: int, data: bytes, token: object) -> None:
        if self._gone():
            self._peer_channels.closed(token)
            channel.closed()  # the peer left while we were opening the other side
            return
        self._peer_channels.opened(token, channel)
        channel.conn = self
        self._accept_channel(channel, sender)
        channel.channelOpen(data)

    def _open_failed(self, f: Failure, sender: int, channel_type: bytes, token: object
                     ) -> None:
        self._peer_channels.closed(token)
        if isinstance(f.value, ChannelRefused):
            self._refuse(sender, f.value.reason, f.value.text, channel_type)
            return
        log.failure("channel open {type!r} failed", f, type=channel_type)
        self._refuse(sender, connection.OPEN_CONNECT_FAILED, "internal error", channel_type)

    def _refuse(self, sender: int, reason: int, text: str, channel_type: bytes) -> None:
        log.info("{peer}: refused channel {type}: {text}", peer=self.transport.peer,
                 type=channel_type.decode("ascii", "replace"), text=text)
        # Counted for metrics where the factory keeps a count (the hub's server).
        refusals = getattr(self.transport.factory, "channel_refusals", None)
        if refusals is not None:
            refusals[reason] += 1
        if self._gone():
            return
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, reason) + common.NS(text.encode()) + common.NS(b""),
        )

    def _gone(self) -> bool:
        return bool(self.transport.isDisconnecting() or self.transport.service is not self)

    # -- global requests: answers may come later, replies stay in order ----

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        request_type, rest = common.getNS(packet)
        want_reply, rest = rest[0], rest[1:]
        try:
            result = self.gotGlobalRequest(request_type, rest)
        except Exception:
            log.failure("global request {req!r} failed", req=request_type)
            result = 0
        if not want_reply:
            return
        slot: list[Any] = [None]
        self._replies.append(slot)

        def answer(value: Any) -> None:
            slot[0] = value or 0
            self._flush_replies()

        def failed(f: Failure) -> None:
            log.failure("global request {req!r} failed", f, req=request_type)
            answer(0)

        defer.maybeDeferred(lambda: result).addCallbacks(answer, failed)

    def _flush_replies(self) -> None:
        while self._replies and self._replies[0][0] is not None:
            value = self._replies.pop(0)[0]
            if self._gone():
                continue
            if value:
                data = value[1] if isinstance(value, (tuple, list)) else b""
                self.transport.sendPacket(connection.MSG_REQUEST_SUCCESS, data)
            else:
                self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")
