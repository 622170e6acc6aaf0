"""One worker process of the hub: `python -m hub.app.worker INDEX [hub options]`.

Started by worker 0 (`hub.app.workers`), never by hand. It runs the shared SSH
listener and what a tunnel, the gateway and the registrar need; its log events go
to stdout as JSON records for worker 0 to log; it stops when SIGTERM comes or when
stdin (the pipe from worker 0) closes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import internet, service
from twisted.internet import protocol, stdio
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    globalLogBeginner,
)
from twisted.python.failure import Failure

from hub.app.config import HubConfig, as_worker
from hub.app.console import worker_weblinks
from hub.app.logs import HeldWrites, RoutineChatter, stdout_destination
from hub.app.peering import add_peering
from hub.app.sharedport import SharedListenerService, parse_tcp_listen
from hub.app.workers import FIGURES_KEY, FIGURES_REQUEST, RECORD_SEPARATOR, line_record
from hub.errors import HubError
from hub.rules.figures import Figure
from hub.ssh.loglevel import GatedLogger
from hub.web.metrics import HubCollector

# Named: run as `python -m`, this module is __main__.
log = Logger(namespace="hub.app.worker")
MAX_REQUEST = 1024


class ParentWatch(protocol.Protocol):
    """Worker 0 holds the other end of stdin: when it closes, worker 0 is gone.

    Worker 0 also asks through it for this worker's live figures (for /metrics),
    which go back as one record among the log records on stdout."""

    def __init__(self, reactor: Any, figures: Callable[[], list[Figure]],
                 out: HeldWrites) -> None:
        self.reactor = reactor
        self.figures = figures
        self.out = out
        self.stopping = False
        self._buffer = b""
        reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self) -> None:
        self.stopping = True

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_REQUEST:
            log.warn("worker 0 sent an overlong line on stdin: ignored")
            self._buffer = b""
        for line in lines:
            if line + b"\n" == FIGURES_REQUEST:
                self.answer_figures()
            elif line.strip():
                log.warn("worker 0 sent an unknown request on stdin: {line!r}",
                         line=line[:100])

    def answer_figures(self) -> None:
        record = json.dumps({FIGURES_KEY: self.figures()}, separators=(",", ":"))
        self.out.write_now(RECORD_SEPARATOR.decode() + record + "\n")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.stopping:  # else the pipe closes because this worker stops
            log.warn("worker 0 is gone: stopping")
            self.reactor.stop()


def make_worker_service(config: HubConfig, index: int, reactor: Any) -> service.MultiService:
    """The worker's services: what `makeService` builds, less what only worker 0 runs."""
    from hub.app.lifecycle import (
        DisconnectOnStop,
        ListenerService,
        OpenFileLimit,
        PortKeeperService,
    )
    from hub.app.service import REGISTRY_POLL, build_hub, build_ssh_factory

    listen = parse_tcp_listen(config.ssh)
    if listen is None:
        raise HubError(f"--ssh {config.ssh}: a worker needs a tcp: endpoint")
    # Worker 0 reset the registry's online flags at its start; the expiry of pending
    # nodes' leases is one pass for the whole registry, worker 0's.
    hub = build_hub(config, reactor, reset_online=False)
    hub.lease_expiry = None
    # Worker 0 runs the web console; this worker gives sign-in links for it.
    hub.weblinks = worker_weblinks(hub)
    factory = build_ssh_factory(hub)
    top = service.MultiService()
    top.hub = hub  # type: ignore[attr-defined]
    # Its live figures, for worker 0's /metrics (the node counts are worker 0's).
    top.figures = HubCollector(  # type: ignore[attr-defined]
        hub.registry, hub.sessions, factory,
        hub.monitoring.counts if hub.monitoring is not None else None, hub.calls).figures
    OpenFileLimit(port_keeper=config.port_keeper).setServiceParent(top)
    if hub.sessions.listener is not None:
        PortKeeperService(hub.sessions.listener).setServiceParent(top)
    SharedListenerService("SSH", listen, factory, reactor).setServiceParent(top)
    DisconnectOnStop(factory).setServiceParent(top)
    if hub.monitoring is not None:
        from hub.app.lifecycle import FlushOnStop

        FlushOnStop(hub.monitoring.flush).setServiceParent(top)
    # The workers reach each other's devices through the peer links (hub.cluster).
    add_peering(top, hub, reactor, ListenerService)
    poll = internet.TimerService(REGISTRY_POLL, hub.sync)
    poll.clock = reactor
    poll.setServiceParent(top)
    return top


# How long a log record may wait to go to worker 0 with those after it.
LOG_BATCH_DELAY = 0.05


def json_observer(level: Any, out: Any) -> ILogObserver:
    """Log records for worker 0 on `out` (a text stream), filtered as worker 0
    filters its own: each is `RS [time, level, namespace, text] LF`, the event's
    text (a failure's traceback included) formatted here (`hub.app.workers.line_record`)."""
    return FilteringLogObserver(FileLogObserver(out, line_record), [RoutineChatter(level)])


def main(argv: list[str]) -> int:
    from twisted.internet import reactor as default_reactor

    from hub.app.service import Options

    reactor: Any = default_reactor
    if not argv or not argv[0].isdigit():
        print("usage: python -m hub.app.worker INDEX [twistd callhomehub options]",
              file=sys.stderr)
        return 2
    index = int(argv[0])
    options = Options()
    try:
        options.parseOptions(argv[1:])
    except SystemExit as e:
        print(f"worker {index}: {e}", file=sys.stderr)
        return 2
    out = HeldWrites(stdout_destination(), reactor, LOG_BATCH_DELAY)
    reactor.addSystemEventTrigger("after", "shutdown", out.flush_now)
    globalLogBeginner.beginLoggingTo([json_observer(options.log_level, out)],
                                     redirectStandardIO=False)
    GatedLogger.drop_below(options.log_level)
    try:
        top = make_worker_service(as_worker(options.hub_config, index), index, reactor)
        top.privilegedStartService()
    except (HubError, SystemExit) as e:
        log.error("worker {index} cannot start: {e}", index=index, e=str(e))
        out.flush_now()
        return 1
    # stdout carries the log records: the watch gets a stdout of its own to not
    # make fd 1 non-blocking (mypy sees Windows' StandardIO signature).
    figures = top.figures  # type: ignore[attr-defined]
    stdio.StandardIO(ParentWatch(reactor, figures, out), stdin=0,  # type: ignore[call-arg]
                     stdout=os.open(os.devnull, os.O_WRONLY), reactor=reactor)
    # Ctrl-C in a terminal reaches the whole process group: worker 0 stops the
    # workers itself (SIGTERM), so one does not end first and look like a crash.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
