"""Monitoring intake: NSCA results in, latest state and bounded history out.

Results arrive through the in-tunnel intake (a device's `direct-tcpip` to
localhost:5667, served in-process on an SSH channel) or the optional plain TCP
listener (`--nsca`). Each is attributed to the node whose tunnel carried it,
checked against strict-host mode, dropped unless that node is approved (anyone
with the Call Home Password has a pending node), stored (history bounded per
host/service so a chatty device cannot fill the disk) and written to the
command file. Drops are logged once a minute per node, with the count held back.
Results waiting to be stored are bounded (`Backlog`): past its limit the
senders are not read until the registry catches up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, TypeVar

from attrs import Factory, define, field, frozen
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.errors import NotFound
from hub.intake.backlog import Backlog
from hub.intake.commandfile import CommandFileWriter
from hub.intake.nsca import CheckResult, format_command
from hub.intake.protocol import NSCAServerFactory, NSCAServerProtocol
from hub.intake.settings import NSCASettings
from hub.rules.throttle import OncePer
from hub.ssh.channels import WINDOW
from hub.ssh.sink import IPacketSink, sink_for
from hub.store.offthread import InlineCalls, RegistryCalls
from hub.store.registry import Registry
from hub.tunnel.descriptors import DescriptorReserve
from hub.tunnel.inprocess import ChannelTransport, ProtocolChannel

log = Logger()
# Seconds between the starts of two stores of results, at least: under load a
# transaction takes the results of this long (at 10,000 results/s, 200).
STORE_INTERVAL = 0.02
# (node, host) pairs whose strict_host answer is kept; past this many, forgotten.
_ALLOWED_KEPT = 4096
T = TypeVar("T")


@frozen
class Status:
    node: str
    host: str
    service: str
    code: int
    output: str
    time: float


@define
class IntakeCounts:
    """Results taken and refused since start, as plain counts the metrics read:
    refused by kind (a packet the decoder rejects: NSCAError.kind; strict_host;
    node_state: from a node not approved)."""

    accepted: int = 0
    rejected: Counter[str] = field(factory=Counter)

    def reject(self, kind: str, n: int = 1) -> None:
        self.rejected[kind] += n


@define(eq=False)
class Monitoring:
    registry: Registry
    config: NSCASettings
    clock: IReactorTime
    command_file: CommandFileWriter | None = None
    counts: IntakeCounts = field(factory=IntakeCounts)
    backlog: Backlog = field(factory=Backlog)
    _pending: list[tuple[str, CheckResult, float]] = field(factory=list)
    _flush_call: Any = None
    _flushed_at: float = float("-inf")  # when the last batch went to the registry
    _allowed: dict[tuple[str, str], bool] = field(factory=dict)
    # The store running in the registry thread, if any (one at a time, see deliver).
    _storing: defer.Deferred[None] | None = None
    _drops: OncePer = field(factory=OncePer)
    # Registry calls off the reactor (hub.store.offthread); the hub's RegistryThread.
    calls: RegistryCalls = field(
        default=Factory(lambda self: InlineCalls(self.registry), takes_self=True))

    def deliver(self, node: str, result: CheckResult) -> None:
        """Keep one result from `node` ("" for the plain TCP listener).

        Results arriving in one reactor turn (a send_nsca burst) are stored in
        one transaction, at the end of that turn: a transaction per result was
        the intake's main cost. While a batch is being stored, later results
        wait and go in one transaction once it is done: under load the batches
        grow instead of the registry thread's queue (and its hand-offs). And a
        transaction starts at most every STORE_INTERVAL: with a fast registry
        the batches were of the few results of one turn, and the registry
        thread spent 12-16 us of CPU per result (a transaction costs it about
        25 us, a result 4 us)."""
        if not self._may_report(node, result.host):
            self.counts.reject("strict_host")
            self._dropped(node, "strict", "NSCA result for host {host!r} from node {node} "
                          "dropped (strict_host): not its name nor mapped to it in "
                          "[nsca.hosts]{more}", host=result.host)
            return
        self._pending.append((node, result, self.clock.seconds()))
        self.backlog.add(1)
        if self._flush_call is None and self._storing is None:
            self._schedule_flush()

    def _may_report(self, node: str, host: str) -> bool:
        """`config.may_report`, remembered: a node reports for the same few hosts
        again and again, and matching [nsca.hosts] globs cost 2 us a result."""
        key = (node, host)
        allowed = self._allowed.get(key)
        if allowed is None:
            if len(self._allowed) >= _ALLOWED_KEPT:
                self._allowed.clear()
            allowed = self._allowed[key] = self.config.may_report(node, host)
        return allowed

    def _schedule_flush(self) -> None:
        wait = self._flushed_at + STORE_INTERVAL - self.clock.seconds()
        self._flush_call = self.clock.callLater(max(0.0, wait), self.flush)

    def flush(self) -> defer.Deferred[None]:
        """Store the pending results now (also called at shutdown); the nodes'
        states are read and the results stored in the registry thread, in one
        transaction, and what was kept or dropped is counted here after."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        batch, self._pending = self._pending, []
        if not batch:
            return defer.succeed(None)
        self._flushed_at = self.clock.seconds()

        def stored(states: dict[str, str]) -> None:
            for node, state in states.items():
                if state != "approved":
                    self.counts.reject("node_state", sum(1 for n, _, _ in batch if n == node))
                    self._dropped(node, "state", "NSCA results from node {node} dropped: the "
                                  "node is {state}, not approved{more}", state=state)
            kept = [item for item in batch if not item[0] or states[item[0]] == "approved"]
            self.counts.accepted += len(kept)
            if self.command_file is not None:
                self.command_file.write_lines(format_command(r, int(now)) for _, r, now in kept)

        def failed(f: Failure) -> None:
            log.error("{n} NSCA result(s) not stored: {why}", n=len(batch),
                      why=f.getErrorMessage())

        done = self.calls.call(store_results, batch, self.config.history).addCallbacks(
            stored, failed)
        self._storing = done
        done.addBoth(self._stored, done, len(batch))
        return done

    def _stored(self, result: object, done: defer.Deferred[None], n: int) -> object:
        self.backlog.stored(n)
        if self._storing is done:
            self._storing = None
            if self._pending and self._flush_call is None:
                self._schedule_flush()
        return result

    def _dropped(self, node: str, why: str, fmt: str, **fields: object) -> None:
        held = self._drops.due(self.clock.seconds(), f"{why}:{node.lower()}")
        if held is not None:
            log.warn(fmt, node=node, more=f" ({held} more dropped since the last line)"
                     if held else "", **fields)

    def tcp_factory(self, descriptors: DescriptorReserve | None = None) -> NSCAServerFactory:
        return NSCAServerFactory(self.config, lambda r: self.deliver("", r), self.clock,
                                 descriptors=descriptors, on_reject=self.counts.reject,
                                 backlog=self.backlog)

    def channel_factory(self, node: str, actor: str, window: int, max_packet: int
                        ) -> NSCAChannel:
        # A 2 MiB window as for tunnels: results are decoded as they arrive, so it
        # holds nothing back, and window adjusts go out every 1 MiB, not every 64 KiB.
        return NSCAChannel(self, node, actor, localWindow=WINDOW,
                           remoteWindow=window, remoteMaxPacket=max_packet)


# Rows per statement, largest first: a batch of results is stored in a few
# multi-row statements (SQLite's executemany runs one step per row, and the
# sqlite3 module lets go of the GIL around each: a hand-off with the reactor
# thread per row), and these few sizes keep the statement cache small.
_STATEMENT_ROWS = (256, 64, 16, 4, 1)
_INSERT = "INSERT INTO results (node, host, service, code, output, time, received) VALUES "
# Everything at or below each check's oldest id to drop, found through the
# (host, service, id) index: cheap whatever the history length.
_PRUNE = (
    "WITH checks(host, service) AS (VALUES {values}),"
    " cut(host, service, id) AS (SELECT host, service,"
    "  (SELECT r.id FROM results r WHERE r.host = checks.host AND r.service = checks.service"
    "   ORDER BY r.id DESC LIMIT 1 OFFSET ?) FROM checks)"
    " DELETE FROM results WHERE id IN (SELECT r.id FROM cut JOIN results r"
    "  ON r.host = cut.host AND r.service = cut.service AND r.id <= cut.id)")


def store_results(registry: Registry, batch: list[tuple[str, CheckResult, float]],
                  history: int) -> dict[str, str]:
    """Store the results of approved nodes (and of the plain listener, node "");
    returns each sending node's state (run in the registry thread)."""
    states: dict[str, str] = {}
    for node in {node for node, _, _ in batch if node}:
        try:
            states[node] = registry.node(node).state
        except NotFound:
            states[node] = "not registered"
    kept = [item for item in batch if not item[0] or states[item[0]] == "approved"]
    if not kept:
        return states
    rows = [(node, r.host, r.service, r.code, r.output, r.timestamp, now)
            for node, r, now in kept]
    checks = list({(r.host, r.service): None for _, r, _ in kept})
    with registry.transaction() as db:
        for results in _statements(rows):
            db.execute(_INSERT + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(results)),
                       [value for row in results for value in row])
        for some in _statements(checks):
            db.execute(_PRUNE.format(values=", ".join(["(?, ?)"] * len(some))),
                       [*(value for check in some for value in check), history])
    return states


def _statements(rows: list[T]) -> Iterator[list[T]]:
    """`rows` in runs of the sizes of _STATEMENT_ROWS, largest first."""
    at = 0
    for size in _STATEMENT_ROWS:
        while len(rows) - at >= size:
            yield rows[at : at + size]
            at += size


def status(registry: Registry, node: str | None = None) -> list[Status]:
    """The latest result of every host/service (of one node's results if given)."""
    rows = registry.query(
        "SELECT node, host, service, code, output, time FROM results"
        " WHERE id IN (SELECT MAX(id) FROM results GROUP BY host, service)"
        " AND (? IS NULL OR node = ? COLLATE NOCASE)"
        " ORDER BY host, service", (node, node))
    return [Status(*row) for row in rows]


class NSCAChannel(ProtocolChannel):
    """A `direct-tcpip` channel to localhost:5667, answered by the in-process intake.

    It grants SSH window itself (`manages_window`), for the bytes the intake
    took, and none while the intake's backlog is full: the sender then waits.
    The packets that one read of the SSH connection carried go to the intake
    together, once the read is dispatched: `ssh -L` sends each read of
    `send_nsca`'s socket, one result, as a packet of its own, and the intake's
    work per call (deadline, decoder, backlog check) was paid per result."""

    name = b"direct-tcpip"
    manages_window = True
    # Its data may come as a view of the transport's packet buffer, valid during
    # dataReceived only: what waits for the end of the read is a copy.
    data_views = True

    def __init__(self, monitoring: Monitoring, node: str, actor: str, **kw: Any) -> None:
        ProtocolChannel.__init__(self, **kw)
        self.protocol = NSCAServerProtocol(
            monitoring.config, lambda r: monitoring.deliver(node, r), monitoring.clock,
            peer=actor, on_reject=monitoring.counts.reject, backlog=monitoring.backlog)
        self._unacked = 0
        self._held = False
        # The data of this read so far, fed to the intake when the read ends.
        self._read: bytearray | None = None
        self._sink: IPacketSink | None = None

    def channelOpen(self, specificData: bytes) -> None:
        self.protocol.makeConnection(PausableChannelTransport(self))

    def dataReceived(self, data: bytes) -> None:
        if self._read is not None:
            self._read += data
            return
        sink = self._sink
        if sink is None:
            sink = self._sink = sink_for(self.conn.transport)
        if sink.callAfterInput(self._endOfRead):
            self._read = bytearray(data)
        else:  # not inside a read of the transport: at once
            self._take(data)

    def _endOfRead(self) -> None:
        read, self._read = self._read, None
        if read is not None:
            self._take(memoryview(read))

    def _take(self, data: bytes | memoryview) -> None:
        self.protocol.dataReceived(data)
        self._unacked += len(data)
        self._grant()

    def eofReceived(self) -> None:
        self._endOfRead()
        ProtocolChannel.eofReceived(self)

    def closed(self) -> None:
        self._endOfRead()
        ProtocolChannel.closed(self)

    def _grant(self) -> None:
        # In batches of a quarter window, as OpenSSH does, not per packet.
        if self._held or self.closing or self._unacked < self.localWindowSize // 4:
            return
        granted, self._unacked = self._unacked, 0
        self.conn.adjustWindow(self, granted)

    def pauseProducing(self) -> None:
        self._held = True

    def resumeProducing(self) -> None:
        self._held = False
        self._grant()


class PausableChannelTransport(ChannelTransport):
    """The intake channel as its protocol's transport, pausable like a TCP one."""

    chan: NSCAChannel

    def pauseProducing(self) -> None:
        self.chan.pauseProducing()

    def resumeProducing(self) -> None:
        self.chan.resumeProducing()
