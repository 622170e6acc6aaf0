"""The NSCA intake as a Twisted protocol: the thin adapter around `nsca.NSCADecoder`.

Sends the init packet, feeds what arrives to the decoder, hands results to a
`deliver` callback, and closes a connection that stalls or sends a bad packet.
Serves both the plain TCP listener (`--nsca`) and the in-tunnel channel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hub.intake.nsca import (
    IV_SIZE,
    CheckResult,
    NSCADecoder,
    NSCAError,
    make_init_packet,
)
from hub.intake.settings import NSCASettings
from hub.timeouts import ClockTimeout


class NSCAServerProtocol(ClockTimeout, Protocol):
    """One NSCA client connection: init packet out, results to `deliver`, errors logged;
    closed after `read_timeout` seconds without a byte."""

    _log = Logger()
    clock: IReactorTime

    def __init__(
        self,
        settings: NSCASettings,
        deliver: Callable[[CheckResult], object],
        clock: IReactorTime,
        iv_source: Callable[[int], bytes] = os.urandom,
        peer: str = "?",
    ) -> None:
        self._settings = settings
        self._deliver = deliver
        self.clock = clock
        self._iv_source = iv_source
        self.peer = peer
        self.decoder: NSCADecoder | None = None
        self._closing = False

    def connectionMade(self) -> None:
        iv = self._iv_source(IV_SIZE)
        s = self._settings
        self.decoder = NSCADecoder(s.encryption, s.password, iv, self.clock.seconds, s.max_age)
        self.setTimeout(s.read_timeout)
        assert self.transport is not None
        self.transport.write(make_init_packet(iv, int(self.clock.seconds())))

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self.decoder is None:
            return
        self.resetTimeout()
        try:
            results = self.decoder.feed(data)
        except NSCAError as e:
            self._deliverAll(e.results)
            self._log.warn(
                "NSCA {peer}: rejected: {reason}; closing", peer=self.peer, reason=e.reason
            )
            self._close()
            return
        self._deliverAll(results)

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
        self._log.info(
            "NSCA {peer}: nothing received for {timeout} s ({pending} bytes of a packet "
            "pending); closing",
            peer=self.peer, timeout=self._settings.read_timeout, pending=pending,
        )
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        if not self._closing and self.decoder is not None and self.decoder.pending:
            self._log.warn(
                "NSCA {peer}: connection closed mid-packet ({pending} bytes dropped)",
                peer=self.peer, pending=self.decoder.pending,
            )


class NSCAServerFactory(Factory):
    """Builds an `NSCAServerProtocol` per connection (TCP listener or in-tunnel channel)."""

    protocol = NSCAServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        settings: NSCASettings,
        deliver: Callable[[CheckResult], object],
        clock: IReactorTime,
        iv_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.settings = settings
        self.deliver = deliver
        self.clock = clock
        self.iv_source = iv_source

    def buildProtocol(self, addr: IAddress | None) -> NSCAServerProtocol:
        host, port = getattr(addr, "host", None), getattr(addr, "port", None)
        peer = f"{host}:{port}" if host is not None else str(addr)
        proto = NSCAServerProtocol(
            self.settings, self.deliver, self.clock, self.iv_source, peer=peer
        )
        proto.factory = self
        return proto
