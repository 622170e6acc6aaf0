"""Where an operator's request goes: a `Route` to a node, or a `Refusal` saying why not.

Pure rules: the caller looks up the operator's grants, the node record and
whether the node is live, and gets a value back. A refusal's text is what the
operator reads (on stderr, or as a channel-open failure with its SSH reason
code); nothing is contacted before a route is returned.
"""

from __future__ import annotations

import struct

from attrs import frozen
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED

from hub.rules.logins import may_reach
from hub.store.rows import NETCONF, Node

# The session requests an operator may make, and how the audit log names them.
LABELS = {b"shell": "shell", b"exec": "exec", b"subsystem": "subsystem"}


@frozen
class Refusal:
    """Why the operator cannot go there: `message` for the operator, `reason` an SSH OPEN_* code.

    `note` is for the hub's log only (never shown: the operator must not learn
    whether a node it may not reach exists)."""

    message: str
    reason: int = OPEN_ADMINISTRATIVELY_PROHIBITED
    note: str | None = None


@frozen
class Route:
    """A session to open on `node`: log in as `user` and send `request` (kind, data).

    A NETCONF node (`netconf`) is not logged in to: the request goes on a new
    channel of its call-home session. `label` names the session in the audit log."""

    node: str
    user: str
    request: tuple[bytes, bytes]
    label: str
    host_key: bytes = b""
    netconf: bool = False


def reach(grants: tuple[str, ...] | None, node: Node | None, name: str) -> Node | Refusal:
    """The approved node `name` stands for, if grants allow it (None: no such operator)."""
    unknown = f"node {name!r} does not exist or you may not reach it"
    if grants is None or node is None:
        return Refusal(unknown)
    if not may_reach(grants, node.name):
        return Refusal(unknown, note=f"not granted node {node.name}")
    if node.state != "approved":
        return Refusal(f"node {node.name} is {node.state}, not approved")
    return node


def tunnel_refusal(user: str, node: Node, live: bool) -> Refusal | None:
    """Why the call-home tunnel of `node` cannot be used, if it cannot."""
    if node.kind == NETCONF:
        return Refusal(f"node {node.name} is a NETCONF device: use "
                       f"ssh -s {user}:{node.name}@hub netconf")
    if not live:
        return Refusal(f"node {node.name} is offline", OPEN_CONNECT_FAILED)
    return None


def session_route(user: str, node: Node, live: bool, kind: bytes, data: bytes,
                  port: str | None) -> Route | Refusal:
    """Where a shell/exec/subsystem request on a reachable node goes.

    `live`: whether the node's tunnel (or NETCONF call-home session) is up;
    `port`: the serial port the login name selected (`alice:NODE:PORT`)."""
    if node.kind == NETCONF:
        if _subsystem(kind, data) != b"netconf" or port is not None:
            return Refusal(f"node {node.name} is a NETCONF device: only its netconf subsystem "
                           f"is offered (ssh -s {user}:{node.name}@hub netconf)")
        if not live:
            return Refusal(f"node {node.name} is offline", OPEN_CONNECT_FAILED)
        return Route(node.name, "", (kind, data), "netconf", netconf=True)
    refusal = tunnel_refusal(user, node, live)
    if refusal is not None:
        return refusal
    if node.host_key is None:
        return Refusal(f"node {node.name} is not enrolled: run callhomehub approve or enroll")
    device_user, request, label = node.device_user, (kind, data), LABELS[kind]
    if port is not None:
        label = f"console {port}"
        if node.console:
            # The node's console template runs the serial port's command on the device.
            request = (b"exec", NS(node.console.replace("{port}", port).encode()))
        else:
            device_user = f"{device_user}:{port}"  # the console server's own port syntax
    return Route(node.name, device_user, request, label, node.host_key)


def route(user: str, grants: tuple[str, ...] | None, node: Node | None, name: str, live: bool,
          kind: bytes, data: bytes, port: str | None) -> Route | Refusal:
    """`reach`, then `session_route`: the whole decision for one session request."""
    found = reach(grants, node, name)
    if isinstance(found, Refusal):
        return found
    return session_route(user, found, live, kind, data, port)


def _subsystem(kind: bytes, data: bytes) -> bytes:
    if kind != b"subsystem" or not data:
        return b""
    try:
        return bytes(getNS(data)[0])
    except struct.error:
        return b""
