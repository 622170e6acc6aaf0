"""Bodies streamed through the proxy with flow control, both ways.

`BodyPump` carries a device's response body to the browser: it is the web
request's streaming producer, so while the browser's connection is full the
device's channel is paused (no window granted) instead of the hub buffering.
`FileBody` sends a request body the web server already holds, paced by the
device's channel window.
"""

from __future__ import annotations

from collections.abc import Callable
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


class RewrittenBody(BodyPump):
    """An HTML page gathered (up to `limit` bytes), rewritten, then sent whole; a
    larger one is sent as it came (what was gathered first, then streamed)."""

    def __init__(self, request: Request, rewrite: Callable[[bytes], bytes], limit: int
                 ) -> None:
        BodyPump.__init__(self, request)
        self.rewrite = rewrite
        self.limit = limit
        self.held: bytearray | None = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if self.held is None:
            BodyPump.dataReceived(self, data)
            return
        self.held += data
        if len(self.held) > self.limit:  # too big to hold: streamed unchanged from here
            held, self.held = bytes(self.held), None
            log.info("HTML page over {limit} bytes: passed on without rewriting",
                     limit=self.limit)
            BodyPump.dataReceived(self, held)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.held is not None and reason.check(ResponseDone, PotentialDataLoss,
                                                  HTTPPotentialDataLoss):
            page = self.rewrite(bytes(self.held))
            self.held = None
            if not self.request.finished and self.request.channel is not None:
                self.request.setHeader(b"content-length", b"%d" % len(page))
                BodyPump.dataReceived(self, page)
        BodyPump.connectionLost(self, reason)


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
