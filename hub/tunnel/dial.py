"""What a channel dialled into a device through its tunnel tells the dialler.

`NodeTunnel.dial` opens a `forwarded-tcpip` channel on the node's connection
and waits for the device to confirm it. The channel classes it opens (the
port listener's splice, the jump host's relay end, the hub's SSH client) mix
in `OpenNotice` and report their open or refusal through it.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.conch.ssh import connection
from twisted.internet import defer

from hub.ssh.connection import ChannelRefused
from hub.ssh.disconnect import open_failure_of

Target = str | int  # a service name ("ssh", "port-8080"), or a port as an operator gives it


def describe(target: Target) -> str:
    return f"port {target}" if isinstance(target, int) else f"service {target}"


def not_forwarded(node: str, target: Target) -> ChannelRefused:
    """The refusal for a dial to a service the node does not forward."""
    what = f"port {target}" if isinstance(target, int) else f"its {target} service"
    return ChannelRefused(connection.OPEN_CONNECT_FAILED, f"node {node} does not forward {what}")


class DeviceRefused(ChannelRefused):
    """The device refused the channel; `cause` is its reason as Conch reported it,
    `code` the device's reason code (None if it sent none) and `words` its reason
    in words (`Connection refused (code 2, connect failed)`)."""

    def __init__(self, node: str, target: Target, cause: Any) -> None:
        self.code, self.words = open_failure_of(cause)
        super().__init__(connection.OPEN_CONNECT_FAILED,
                         f"node {node} {describe(target)}: {self.words}")
        self.cause = cause


class Dialled(Protocol):
    """A channel `NodeTunnel.dial` can open (see `OpenNotice`)."""

    @property
    def opened(self) -> defer.Deferred[Any]: ...

    def openFailed(self, reason: Any) -> None: ...


class OpenNotice:
    """Mixed into a channel the hub dials into a device: its `channelOpen` calls
    `notify_open()`, its `openFailed` calls `notify_failed(reason)`, and
    `opened` fires with the channel, or fails with that reason.

    The Deferred is made when someone asks for `opened`: a port's connection
    opened on the listener's own forward (`NodeTunnel.open_pipe`) has nobody
    waiting, and its outcome is only kept (no Deferred per connection, and no
    "Unhandled error in Deferred" for a refusal nobody waited on: the splice
    logs the refusal itself)."""

    _opened: defer.Deferred[Any] | None = None
    # (True, the channel) or (False, the reason), while nobody asked for `opened`.
    _outcome: tuple[bool, Any] | None = None

    @property
    def opened(self) -> defer.Deferred[Any]:
        if self._opened is None:
            self._opened = defer.Deferred()
            if self._outcome is not None:
                self._notify(*self._outcome)
        return self._opened

    def notify_open(self) -> None:
        self._notify(True, self)

    def notify_failed(self, reason: Any) -> None:
        self._notify(False, reason if isinstance(reason, BaseException)
                     else ChannelRefused(connection.OPEN_CONNECT_FAILED, str(reason)))

    def _notify(self, ok: bool, value: Any) -> None:
        if self._opened is None:
            if self._outcome is None:
                self._outcome = (ok, value)
        elif not self._opened.called:
            if ok:
                self._opened.callback(value)
            else:
                self._opened.errback(value)
