"""The admin CLI's line to the running hub, for what needs a live tunnel.

A UNIX socket `DATA/control.sock` (mode 0600, so root or the hub's user only)
carrying one JSON request and one JSON answer per connection:
`verify` (after `approve`: log in with the management key, pin the host key)
and `enroll` (log in once with the device password, install the management
key, pin the host key; the password is used and forgotten, never stored).
`run` (a fleet command) answers one JSON line per node as each one ends, then
the summary.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from hub.access.device_client import DeviceError, KeyRefused, connect, run_command
from hub.access.fleet import run_on_node, run_on_nodes
from hub.app.context import Hub
from hub.errors import HubError, NotFound
from hub.rules.fleet import OFFLINE, Outcome, select, summary_line, tally
from hub.rules.pairs import fleet_pairs
from hub.ssh.keys import fingerprint
from hub.ssh.usercerts import DeviceIdentity, authorized_keys_line, load_user_ca
from hub.store.registry import Registry

log = Logger()

SOCKET_NAME = "control.sock"
MAX_REQUEST = 16 * 1024
MAX_PARALLEL = 100
MAX_RUN_TIMEOUT = 3600.0


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

    async def _tunnel(self, name: str) -> tuple[Any, Any]:
        node = await self.hub.calls.call(Registry.node, name)
        tunnel = self.hub.sessions.get(node.name)
        if tunnel is None:
            raise HubError(f"node {node.name} is offline; it must be connected")
        return node, tunnel

    async def verify(self, name: str, actor: str) -> str:
        node, tunnel = await self._tunnel(name)
        ready, client = connect(tunnel, node.device_user, self.hub.device_identity,
                                node.host_key, clock=self.hub.clock)
        try:
            conn = await ready
        except KeyRefused as e:
            # Only here is enrollment the remedy (not when the device's sshd is down).
            raise KeyRefused(f"{e}; if the device has not authorized the hub's management "
                             f"key, run: callhomehub enroll {node.name}") from None
        conn.close()
        how = "certificate" if client.by_certificate else "management key"
        if node.host_key is None:
            assert client.host_key is not None
            await self.hub.calls.call(Registry.set_device_access, node.name, actor,
                                      host_key=client.host_key)
            return (f"{how} login as {node.device_user} verified; host key "
                    f"{fingerprint(client.host_key)} pinned")
        return f"{how} login as {node.device_user} verified"

    def _enroll_ca(self, user: str) -> tuple[str, DeviceIdentity]:
        """`enroll --login ca`: the line to install and the certificate-only identity."""
        if self.hub.config.device_login != "ca":
            raise HubError('--login ca: the hub logs in to devices with its management key; '
                           'set [devices] login = "ca" in its config file and restart it')
        ca = load_user_ca(self.hub.config.keys_dir)
        if ca is None:
            raise HubError("--login ca: the hub has no user CA; run: callhomehub ca init")
        return (authorized_keys_line(ca, user),
                DeviceIdentity(self.hub.keys.mgmt, self.hub.user_ca, key_fallback=False))

    async def enroll(self, name: str, user: str, password: str, actor: str,
                     login: str = "key") -> str:
        node, tunnel = await self._tunnel(name)
        if login == "ca":
            line, identity = self._enroll_ca(user)
            what = "hub CA"
        else:
            line, identity = self.hub.keys.mgmt_public_line, DeviceIdentity(self.hub.keys.mgmt)
            what = "management key"
        # Enrollment is when a (new) host key is accepted: no pin to check against.
        ready, client = connect(tunnel, user, identity, None,
                                password.encode(), clock=self.hub.clock)
        conn = await ready
        assert client.host_key is not None
        if client.logged_in_with == b"publickey":
            # The device took the management key before the password was needed:
            # nothing to install, and the password was never checked.
            conn.close()
            await self.hub.calls.call(Registry.set_device_access, node.name, actor,
                                      host_key=client.host_key, device_user=user)
            self.hub.calls.write(Registry.audit, actor, "enroll", node.name,
                                 f"user {user}: {what} already authorized, nothing installed")
            return (f"{what} already authorized for {user}: nothing installed "
                    f"(the password was not used); host key {fingerprint(client.host_key)} "
                    "pinned")
        try:
            status, _out, err = await run_command(conn, install_key_command(line))
        finally:
            conn.close()
        if status != 0:
            raise DeviceError(f"installing the {what} failed on the device: "
                              + (err.decode("utf-8", "replace").strip() or f"exit {status}"))
        await self.hub.calls.call(Registry.set_device_access, node.name, actor,
                                  host_key=client.host_key, device_user=user)
        ready, _ = connect(tunnel, user, identity, client.host_key, clock=self.hub.clock)
        (await ready).close()
        self.hub.calls.write(Registry.audit, actor, "enroll", node.name,
                             f"user {user}: {what} installed")
        return (f"{what} installed for {user} and verified; host key "
                f"{fingerprint(client.host_key)} pinned")

    async def run(self, request: dict[str, Any], emit: Callable[[dict[str, Any]], None]
                  ) -> dict[str, Any]:
        """A fleet command: `command` on the approved nodes matching `nodes`."""
        pattern, command = str(request.get("nodes") or "*"), str(request.get("command", ""))
        parallel, timeout = int(request.get("parallel", 10)), float(request.get("timeout", 60))
        actor = str(request.get("actor", "cli"))
        if not command.strip():
            raise HubError("run: no command given")
        if not 1 <= parallel <= MAX_PARALLEL or not 0 < timeout <= MAX_RUN_TIMEOUT:
            raise HubError(f"run: --parallel must be 1-{MAX_PARALLEL} and --timeout "
                           f"0-{MAX_RUN_TIMEOUT:g} s")
        listed, on_file = await self.hub.calls.call(lambda r: (r.nodes(), r.pairs()))
        nodes = {n.name: n for n in listed}
        # A pair matched (not its members) is run on its active member.
        live_pairs = self.hub.sessions.pairs
        pairs = {p.name for p in fleet_pairs(pattern, on_file)}
        online, offline = select(pattern, [
            *((n.name, n.state, self.hub.sessions.get(n.name) is not None)
              for n in nodes.values()),
            *((p, "approved", live_pairs.active_tunnel(p) is not None) for p in pairs)])
        log.info("{actor}: run {command!r} on {n} node(s) matching {pattern} "
                 "({offline} offline)", actor=actor, command=command, n=len(online),
                 pattern=pattern, offline=len(offline))
        emit({"plan": {"nodes": len(online) + len(offline), "offline": len(offline)}})
        outcomes = [Outcome(name, OFFLINE, message="no tunnel now") for name in offline]
        for outcome in outcomes:
            emit({"outcome": outcome.as_json()})

        def start(name: str) -> defer.Deferred[Outcome]:
            if name in pairs:
                name = live_pairs.active(name) or name
            tunnel = self.hub.sessions.get(name)
            if tunnel is None:  # went away while waiting for its turn
                return defer.succeed(Outcome(name, OFFLINE, message="no tunnel now"))
            return run_on_node(nodes[name], tunnel, self.hub.device_identity, command.encode(),
                               timeout, self.hub.clock)

        outcomes += await run_on_nodes(online, start, parallel,
                                       lambda o: emit({"outcome": o.as_json()}))
        counts = tally(outcomes)
        self.hub.calls.write(Registry.audit, actor, "run", pattern,
                             f"command {command!r}: {summary_line(counts)}")
        return {"ok": True, "summary": counts,
                "message": f"{len(outcomes)} node(s): {summary_line(counts)}"}

    async def handle(self, request: dict[str, Any],
                     emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        op, actor = request.get("op"), str(request.get("actor", "cli"))
        try:
            if op == "verify":
                message = await self.verify(str(request["node"]), actor)
            elif op == "run" and emit is not None:
                return await self.run(request, emit)
            elif op == "enroll":
                message = await self.enroll(str(request["node"]), str(request["user"]),
                                            str(request["password"]), actor,
                                            str(request.get("login", "key")))
            else:
                return {"ok": False, "message": f"unknown operation {op!r}"}
        except (HubError, NotFound, KeyError, ValueError) as e:
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
        d = defer.ensureDeferred(self.controller.handle(request, self._emit))
        d.addCallbacks(self._answer, lambda f: self._answer(
            {"ok": False, "message": f"internal error: {f.getErrorMessage()}"}))

    def _emit(self, line: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(line).encode() + b"\n")

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


def ask(data_dir: str, request: dict[str, Any], timeout: float = 90.0,
        progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Send one request to the running hub; None when no hub is listening.

    Lines the hub sends before its answer (a fleet command's outcomes) go to
    `progress`; `timeout` bounds the wait for each line.
    """
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
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return {"ok": False, "message": "the hub gave no answer"}
            data += chunk
            while b"\n" in data:
                line, data = data.split(b"\n", 1)
                try:
                    answer = json.loads(line)
                except ValueError:
                    return {"ok": False, "message": "the hub gave no answer"}
                if not isinstance(answer, dict):
                    return None
                if "ok" not in answer and progress is not None:
                    progress(answer)
                    continue
                return answer
