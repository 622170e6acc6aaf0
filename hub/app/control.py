"""The admin CLI's line to the running hub, for what needs a live tunnel.

A UNIX socket `DATA/control.sock` (mode 0600, so root or the hub's user only)
carrying one JSON request and one JSON answer per connection:
`verify` (after `approve`: log in with the management key, pin the host key)
and `enroll` (log in once with the device password, install the management
key, pin the host key; the password is used and forgotten, never stored).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from hub.access.device_client import DeviceError, KeyRefused, connect, run_command
from hub.app.context import Hub
from hub.errors import HubError, NotFound
from hub.ssh.keys import fingerprint

log = Logger()

SOCKET_NAME = "control.sock"
MAX_REQUEST = 16 * 1024


def install_key_command(key_line: str) -> bytes:
    line = key_line.strip()
    return (
        "umask 077; mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && "
        f"(grep -qxF '{line}' ~/.ssh/authorized_keys || "
        f"printf '%s\\n' '{line}' >> ~/.ssh/authorized_keys)").encode()


class Controller:
    """What the control socket can ask of the hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def _tunnel(self, name: str) -> tuple[Any, Any]:
        node = self.hub.registry.node(name)
        tunnel = self.hub.sessions.get(node.name)
        if tunnel is None:
            raise HubError(f"node {node.name} is offline; it must be connected")
        return node, tunnel

    async def verify(self, name: str, actor: str) -> str:
        node, tunnel = self._tunnel(name)
        ready, client = connect(tunnel, node.device_user, self.hub.keys.mgmt, node.host_key,
                                clock=self.hub.clock)
        try:
            conn = await ready
        except KeyRefused as e:
            # Only here is enrollment the remedy (not when the device's sshd is down).
            raise KeyRefused(f"{e}; if the device has not authorized the hub's management "
                             f"key, run: callhomehub enroll {node.name}") from None
        conn.close()
        if node.host_key is None:
            assert client.host_key is not None
            self.hub.registry.set_device_access(node.name, actor, host_key=client.host_key)
            return (f"management key login as {node.device_user} verified; host key "
                    f"{fingerprint(client.host_key)} pinned")
        return f"management key login as {node.device_user} verified"

    async def enroll(self, name: str, user: str, password: str, actor: str) -> str:
        node, tunnel = self._tunnel(name)
        # Enrollment is when a (new) host key is accepted: no pin to check against.
        ready, client = connect(tunnel, user, self.hub.keys.mgmt, None,
                                password.encode(), clock=self.hub.clock)
        conn = await ready
        assert client.host_key is not None
        if client.logged_in_with == b"publickey":
            # The device took the management key before the password was needed:
            # nothing to install, and the password was never checked.
            conn.close()
            self.hub.registry.set_device_access(node.name, actor, host_key=client.host_key,
                                                device_user=user)
            self.hub.registry.audit(actor, "enroll", node.name,
                                    f"user {user}: management key already authorized, "
                                    "nothing installed")
            return (f"management key already authorized for {user}: nothing installed "
                    f"(the password was not used); host key {fingerprint(client.host_key)} "
                    "pinned")
        try:
            status, _out, err = await run_command(
                conn, install_key_command(self.hub.keys.mgmt_public_line))
        finally:
            conn.close()
        if status != 0:
            raise DeviceError("installing the management key failed on the device: "
                              + (err.decode("utf-8", "replace").strip() or f"exit {status}"))
        self.hub.registry.set_device_access(node.name, actor, host_key=client.host_key,
                                            device_user=user)
        ready, _ = connect(tunnel, user, self.hub.keys.mgmt, client.host_key,
                           clock=self.hub.clock)
        (await ready).close()
        self.hub.registry.audit(actor, "enroll", node.name,
                                f"user {user}: management key installed")
        return (f"management key installed for {user} and verified; host key "
                f"{fingerprint(client.host_key)} pinned")

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op, actor = request.get("op"), str(request.get("actor", "cli"))
        try:
            if op == "verify":
                message = await self.verify(str(request["node"]), actor)
            elif op == "enroll":
                message = await self.enroll(str(request["node"]), str(request["user"]),
                                            str(request["password"]), actor)
            else:
                return {"ok": False, "message": f"unknown operation {op!r}"}
        except (HubError, NotFound, KeyError) as e:
            return {"ok": False, "message": str(e)}
        return {"ok": True, "message": message}


class ControlProtocol(LineOnlyReceiver):
    MAX_LENGTH = MAX_REQUEST
    delimiter = b"\n"

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self._answer({"ok": False, "message": f"malformed request: {e}"})
            return
        d = defer.ensureDeferred(self.controller.handle(request))
        d.addCallbacks(self._answer, lambda f: self._answer(
            {"ok": False, "message": f"internal error: {f.getErrorMessage()}"}))

    def _answer(self, answer: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(answer).encode() + b"\n")
            self.transport.loseConnection()


class ControlFactory(protocol.Factory):
    noisy = False

    def __init__(self, hub: Hub) -> None:
        self.controller = Controller(hub)

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.controller)


def control_endpoint(data_dir: str) -> str:
    path = os.path.abspath(os.path.join(data_dir, SOCKET_NAME))
    return "unix:" + path.replace("\\", "\\\\").replace(":", "\\:") + ":mode=600:lockfile=1"


def ask(data_dir: str, request: dict[str, Any], timeout: float = 90.0) -> dict[str, Any] | None:
    """Send one request to the running hub; None when no hub is listening."""
    path = os.path.join(data_dir, SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    with sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        answer = json.loads(data)
    except ValueError:
        return {"ok": False, "message": "the hub gave no answer"}
    return answer if isinstance(answer, dict) else None
