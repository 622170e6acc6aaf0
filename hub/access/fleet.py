"""Fleet commands: one command on many nodes over the management login, a few at a time.

Each node is reached the way the console gateway reaches it (through its tunnel,
as its device user, with the hub's management key and its pinned host key). At
most `parallel` nodes run at once; each gets `timeout` seconds for login and
command together, after which its device connection is closed. Every node ends in
one `Outcome`, handed to `emit` as soon as it is known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.access.device_client import DeviceConnection, DeviceError, connect, run_command
from hub.rules.fleet import ERROR, TIMEOUT, Outcome, finished
from hub.ssh.usercerts import DeviceIdentity
from hub.store.registry import NETCONF, Node
from hub.tunnel.live import NodeTunnel

log = Logger()


def run_on_node(node: Node, tunnel: NodeTunnel, key: keys.Key | DeviceIdentity, command: bytes,
                timeout: float, clock: IReactorTime) -> defer.Deferred[Outcome]:
    """Log in to one node, run `command`, close; never fails (an `Outcome` says why)."""
    if node.kind == NETCONF:
        return defer.succeed(Outcome(node.name, ERROR, message="a NETCONF device runs no "
                                     "commands; use its netconf subsystem"))
    if node.host_key is None:
        return defer.succeed(Outcome(node.name, ERROR, message="not enrolled: run "
                                     f"callhomehub approve {node.name} or enroll"))
    result: defer.Deferred[Outcome] = defer.Deferred()

    def settle(outcome: Outcome) -> None:
        if not result.called:
            if timer.active():
                timer.cancel()
            result.callback(outcome)

    def failed(f: Failure) -> Outcome:
        why = str(f.value) if f.check(DeviceError) else f.getErrorMessage()
        return Outcome(node.name, ERROR, message=why)

    def logged_in(conn: DeviceConnection) -> None:
        if result.called:  # timed out meanwhile
            conn.close()
            return
        def ran(result: tuple[int, bytes, bytes]) -> Outcome:
            return finished(node.name, *result)

        d = run_command(conn, command).addCallback(ran).addErrback(failed)
        d.addCallback(settle).addBoth(lambda _: conn.close())

    def timed_out() -> None:
        settle(Outcome(node.name, TIMEOUT, message=f"no answer within {timeout:g} s"))
        if client.transport is not None:  # else the login is closed when it completes
            client.loseConnection()

    ready, client = connect(tunnel, node.device_user, key, node.host_key, clock=clock)
    timer = clock.callLater(timeout, timed_out)
    ready.addCallbacks(logged_in, lambda f: settle(failed(f)))
    return result


def run_on_nodes(names: Sequence[str], start: Callable[[str], defer.Deferred[Outcome]],
                 parallel: int, emit: Callable[[Outcome], None]
                 ) -> defer.Deferred[list[Outcome]]:
    """`start` each node with at most `parallel` running at once; the outcomes in order."""
    gate = defer.DeferredSemaphore(max(1, parallel))

    def one(name: str) -> defer.Deferred[Outcome]:
        def done(outcome: Outcome) -> Outcome:
            emit(outcome)
            return outcome
        return gate.run(start, name).addCallback(done)

    return defer.gatherResults([one(name) for name in names], consumeErrors=True)
