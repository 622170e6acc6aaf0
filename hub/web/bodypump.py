"""Bodies streamed through the proxy with flow control, both ways.

`BodyPump` carries a device's response body to the browser: it is the web
request's streaming producer, so while the browser's connection is full the
device's channel is paused (no window granted) instead of the hub buffering.
`FileBody` sends a request body the web server already holds, paced by the
device's channel window.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import PotentialDataLoss as HTTPPotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

log = Logger()

CHUNK = 64 * 1024


@implementer(IPushProducer)
class BodyPump(protocol.Protocol):
    """A device's response body, written to the browser's request as it arrives."""

    transport: Any  # the Agent's producer for the response body

    def __init__(self, request: Request, discard: bool = False) -> None:
        self.request = request
        self.discard = discard
        self.sent = 0

    def connectionMade(self) -> None:
        # The browser leaving mid-body must close the device's channel too: the web
        # server does not stop a streaming producer when its connection is lost.
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        if not self.discard:
            self.request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.discard and not self.request.finished:
            self.sent += len(data)
            self.request.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        request = self.request
        if request.finished or request.channel is None:
            return  # the browser left; nothing to finish or unregister
        if not self.discard:
            request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss, HTTPPotentialDataLoss):
            request.finish()
            return
        # The device went away mid-body: the browser must see a truncated download,
        # not a complete one.
        log.info("device response body cut after {sent} bytes: {why}", sent=self.sent,
                 why=reason.getErrorMessage())
        transport: Any = request.channel.transport
        if transport is not None:
            transport.abortConnection()

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


@implementer(IBodyProducer)
class FileBody:
    """A request body from a file, written while the consumer does not push back."""

    def __init__(self, content: IO[bytes], length: int) -> None:
        self.content = content
        self.length: int | object = length if length >= 0 else UNKNOWN_LENGTH
        self._consumer: Any = None
        self._paused = False
        self._done: defer.Deferred[None] | None = None

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        self._consumer = consumer
        self._done = defer.Deferred()
        self._pump()
        return self._done

    def _pump(self) -> None:
        while not self._paused and self._done is not None and not self._done.called:
            chunk = self.content.read(CHUNK)
            if not chunk:
                self._done.callback(None)
                return
            self._consumer.write(chunk)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._pump()

    def stopProducing(self) -> None:
        self._paused = True
        self._done = None  # the request was abandoned: its Deferred is Agent's to drop
