"""The NSCA intake as a Twisted protocol: the thin adapter around `nsca.NSCADecoder`.

Sends the init packet, feeds what arrives to the decoder, hands results to a
`deliver` callback, and closes a connection that stalls or sends a bad packet.
Serves both the plain TCP listener (`--nsca`) and the in-tunnel channel; the
listener's factory bounds its connections, globally and per source address.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.intake.backlog import Backlog
from hub.intake.nsca import (
    IV_SIZE,
    CheckResult,
    NSCADecoder,
    NSCAError,
    make_init_packet,
)
from hub.intake.settings import NSCASettings
from hub.rules.throttle import OncePer
from hub.timeouts import ClockTimeout
from hub.tunnel.descriptors import DescriptorReserve


class NSCAServerProtocol(ClockTimeout, Protocol):
    """One NSCA client connection: init packet out, results to `deliver`, errors logged.

    Deadlines are absolute, never moved by single bytes (a byte every 20 s once
    held a connection for ever): the client has `read_timeout` seconds from the
    connection start or from its last complete packet to start the next, and
    `read_timeout` seconds from a packet's first byte to complete it. While the
    intake's backlog is full (`backlog`) the connection is not read, and no
    deadline runs: the client is not the one that is slow."""

    _log = Logger()
    clock: IReactorTime

    def __init__(
        self,
        settings: NSCASettings,
        deliver: Callable[[CheckResult], object],
        clock: IReactorTime,
        iv_source: Callable[[int], bytes] = os.urandom,
        peer: str = "?",
        on_reject: Callable[[str], object] | None = None,
        backlog: Backlog | None = None,
    ) -> None:
        self._settings = settings
        self._backlog = backlog
        # Told the kind of each rejected packet (NSCAError.kind), for metrics.
        self._on_reject = on_reject
        self._deliver = deliver
        self.clock = clock
        self._iv_source = iv_source
        self.peer = peer
        self.decoder: NSCADecoder | None = None
        self._closing = False
        self.on_lost: Callable[[], object] | None = None

    def connectionMade(self) -> None:
        iv = self._iv_source(IV_SIZE)
        s = self._settings
        self.decoder = NSCADecoder(s.encryption, s.password, iv, self.clock.seconds, s.max_age)
        self.setTimeout(s.read_timeout)
        assert self.transport is not None
        self.transport.write(make_init_packet(iv, int(self.clock.seconds())))

    def dataReceived(self, data: bytes | memoryview) -> None:
        if self._closing or self.decoder is None or not data:
            return
        idle = self.decoder.pending == 0
        try:
            results = self.decoder.feed(data)
        except NSCAError as e:
            self._deliverAll(e.results)
            if self._on_reject is not None:
                self._on_reject(e.kind)
            self._log.warn(
                "NSCA {peer}: rejected: {reason}; closing", peer=self.peer, reason=e.reason
            )
            self._close()
            return
        if idle or results:
            # A packet completed or a new one started: the next deadline counts from
            # now; bytes in the middle of a packet leave it where it is.
            self.setTimeout(self._settings.read_timeout)
        self._deliverAll(results)
        if results and self._backlog is not None:
            self._backlog.check(self)

    def pauseProducing(self) -> None:
        """Stop reading (the backlog is full), and the deadlines with it."""
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.setTimeout(None)

    def resumeProducing(self) -> None:
        if self._closing or self.transport is None:
            return
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.setTimeout(self._settings.read_timeout)

    def _deliverAll(self, results: Sequence[CheckResult]) -> None:
        for result in results:
            try:
                self._deliver(result)
            except Exception:
                # One failing consumer must not cost the client its other results.
                self._log.failure(
                    "NSCA {peer}: deliver failed for {host}/{service}",
                    peer=self.peer, host=result.host, service=result.service,
                )

    def timeoutConnection(self) -> None:
        pending = self.decoder.pending if self.decoder is not None else 0
        if pending:
            self._log.info(
                "NSCA {peer}: packet not complete within {timeout:g} s of its first byte "
                "({pending} bytes of it received); closing",
                peer=self.peer, timeout=self._settings.read_timeout, pending=pending,
            )
        else:
            self._log.info("NSCA {peer}: nothing received for {timeout:g} s; closing",
                           peer=self.peer, timeout=self._settings.read_timeout)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        if self._backlog is not None:
            self._backlog.forget(self)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()
        if not self._closing and self.decoder is not None and self.decoder.pending:
            self._log.warn(
                "NSCA {peer}: connection closed mid-packet ({pending} bytes dropped)",
                peer=self.peer, pending=self.decoder.pending,
            )


class NSCAServerFactory(Factory):
    """The `--nsca` listener: an `NSCAServerProtocol` per connection, at most
    `max_connections` at once and `max_connections_per_source` from one address.

    A connection over a cap is closed at once (Twisted closes it when
    `buildProtocol` returns None), with one log line a minute for all of them."""

    noisy = False
    _log = Logger()

    protocol = NSCAServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        settings: NSCASettings,
        deliver: Callable[[CheckResult], object],
        clock: IReactorTime,
        iv_source: Callable[[int], bytes] = os.urandom,
        descriptors: DescriptorReserve | None = None,
        on_reject: Callable[[str], object] | None = None,
        backlog: Backlog | None = None,
    ) -> None:
        self.settings = settings
        self.backlog = backlog
        self.on_reject = on_reject
        self.deliver = deliver
        self.clock = clock
        self.iv_source = iv_source
        # Descriptors kept for SSH logins: NSCA gives way before they run out.
        self.descriptors = descriptors
        self.open = 0
        self.by_source: dict[str, int] = {}
        self._refusals = OncePer(60.0)

    def buildProtocol(self, addr: IAddress | None) -> NSCAServerProtocol | None:
        host, port = getattr(addr, "host", None), getattr(addr, "port", None)
        peer = f"{host}:{port}" if host is not None else str(addr)
        source = str(host)
        s = self.settings
        if self.open >= s.max_connections:
            self._refuse(peer, f"{self.open} connections open (max_connections)")
            return None
        if self.by_source.get(source, 0) >= s.max_connections_per_source:
            self._refuse(peer, f"{self.by_source[source]} connections open from "
                               f"{source} (max_connections_per_source)")
            return None
        if self.descriptors is not None and not self.descriptors.allows("NSCA"):
            return None  # DescriptorReserve logs when refusing starts and ends
        proto = NSCAServerProtocol(
            self.settings, self.deliver, self.clock, self.iv_source, peer=peer,
            on_reject=self.on_reject, backlog=self.backlog,
        )
        proto.factory = self
        self.open += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        proto.on_lost = lambda: self._closed(source)
        return proto

    def _closed(self, source: str) -> None:
        self.open -= 1
        left = self.by_source.pop(source) - 1
        if left:
            self.by_source[source] = left

    def _refuse(self, peer: str, why: str) -> None:
        held = self._refusals.due(self.clock.seconds())
        if held is not None:
            self._log.warn("refusing NSCA connection from {peer}: {why}{more}", peer=peer,
                           why=why, more=f" ({held} more refused since the last line)"
                           if held else "")
