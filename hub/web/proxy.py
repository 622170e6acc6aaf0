"""The device web UI proxy: `/nodes/NAME/web/…` served by the node's own web server.

The core's router mounts `device_web_resource(reach, NAME, ...)` for a signed-in
operator. Each request is checked by the operator's `OperatorReach`, then carried
to the node's `http` forward (else `https`, TLS without certificate verification:
devices have self-signed certificates) through the tunnel with `NodeTunnel.dial`.
Headers are filtered and rewritten by hub.rules.webproxy; bodies stream both ways
with flow control. See docs/web-proxy.md.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh.connection import OPEN_CONNECT_FAILED
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from hub.access.reach import OperatorReach
from hub.rules.throttle import OncePer
from hub.rules.webproxy import (
    HTML_REWRITE_MAX,
    ProxySettings,
    device_target,
    prefix_of,
    request_headers,
    response_headers,
    rewrite_html,
    rewrites_html,
)
from hub.ssh.connection import ChannelRefused
from hub.tunnel.dial import DeviceRefused
from hub.tunnel.live import NodeTunnel
from hub.web.bodypump import BodyPump, FileBody, RewrittenBody
from hub.web.errors import send_error
from hub.web.later import render_later
from hub.web.tunnelstream import TunnelEndpoint
from hub.web.tunneltls import InsecureTLS

log = Logger()

WEB_SERVICES = ("http", "https")


def pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


class BrowseAudit:
    """One `browse` audit entry per operator and node, then at most one per interval:
    a page is dozens of requests, the audit wants the visit."""

    def __init__(self, clock: IReactorTime, interval: float = 600.0) -> None:
        self.clock = clock
        self._once = OncePer(interval=interval, max_keys=4096)

    def seen(self, reach: OperatorReach, node: str, service: str) -> None:
        if self._once.due(self.clock.seconds(), f"{reach.login.user}\0{node}") is None:
            return
        actor = reach.actor
        log.info("{actor} browses node {node} ({service} forward) via web",
                 actor=actor, node=node, service=service)
        reach.needs.grants.audit(actor, "browse", node, f"{service} via web")


@implementer(IAgentEndpointFactory)
class _ToForward:
    def __init__(self, tunnel: NodeTunnel, service: str, clock: IReactorTime) -> None:
        self.tunnel = tunnel
        self.service = service
        self.clock = clock

    def endpointForURI(self, uri: Any) -> Any:
        endpoint = TunnelEndpoint(self.tunnel, self.service)
        return InsecureTLS(endpoint, self.clock) if self.service == "https" else endpoint


class DeviceWebResource(Resource):
    """One node's web UI for one operator (a leaf: everything below the prefix)."""

    isLeaf = True

    def __init__(self, reach: OperatorReach, node: str, settings: ProxySettings,
                 clock: IReactorTime, browse: BrowseAudit) -> None:
        super().__init__()
        self.reach = reach
        self.node = node
        self.settings = settings
        self.clock = clock
        self.browse = browse
        self.prefix = prefix_of(node)

    def render(self, request: Request) -> Any:
        path, _, query = request.uri.partition(b"?")
        segments = path.split(b"/")[1:][len(request.prepath or ()):]
        if not segments:  # `/nodes/NAME/web`: the device's pages expect a directory
            request.redirect((self.prefix + "/").encode() + (b"?" + query if query else b""))
            return b""
        # The grants are read off the reactor; the request goes on once checked.
        return render_later(request, self.reach.checked(self.node).addCallback(
            self._checked, request, segments, query if _ else None))

    def _checked(self, reach: OperatorReach, request: Request, segments: list[bytes],
                 query: bytes | None) -> bytes | None:
        try:
            tunnel = reach.resolve(self.node)[1]
        except ChannelRefused as e:
            if e.reason == OPEN_CONNECT_FAILED:
                return send_error(request, http.SERVICE_UNAVAILABLE, e.text)
            return send_error(request, http.NOT_FOUND, e.text)
        service = next((s for s in WEB_SERVICES if tunnel.table.lookup(s) is not None), None)
        if service is None:
            return send_error(request, http.NOT_FOUND,
                              f"node {self.node} forwards no web service")
        body = self._body(request)
        if body is None:
            log.info("{actor}: request body to node {node} over {limit} bytes refused",
                     actor=self.reach.actor, node=self.node, limit=self.settings.max_body)
            return send_error(request, http.REQUEST_ENTITY_TOO_LARGE,
                              f"request bodies to a device are limited to "
                              f"{self.settings.max_body} bytes")
        self.browse.seen(self.reach, self.node, service)
        self._forward(request, tunnel, service, device_target(segments, query), body)
        return None

    def _body(self, request: Request) -> FileBody | bool | None:
        """The request body as a producer, False for none, None when it is too large."""
        content = request.content
        if content is None:
            return False
        content.seek(0, 2)
        size = content.tell()
        declared = request.getHeader(b"content-length")
        if size > self.settings.max_body or (
                declared is not None and declared.isdigit()
                and int(declared) > self.settings.max_body):
            return None
        content.seek(0)
        if size == 0 and request.method in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
            return False
        return FileBody(content, size)

    def _forward(self, request: Request, tunnel: NodeTunnel, service: str, target: bytes,
                 body: FileBody | bool | None) -> None:
        host = request.getHeader(b"host") or b""
        secure = request.isSecure()
        headers = request_headers(
            pairs(request.requestHeaders), client=str(getattr(
                request.getClientAddress(), "host", "")),
            proto="https" if secure else "http", host=host, prefix=self.prefix)
        agent = Agent.usingEndpointFactory(
            self.clock, _ToForward(tunnel, service, self.clock),
            pool=HTTPConnectionPool(self.clock, persistent=False))
        outgoing = Headers()
        for name, value in headers:
            outgoing.addRawHeader(name, value)
        producer = body if isinstance(body, FileBody) else None
        d = agent.request(request.method, b"http://localhost" + target, outgoing, producer)
        timed_out: list[bool] = []

        def time_out() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self.clock.callLater(self.settings.timeout, time_out)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stop_timer)
        gone: list[bool] = []

        def browser_gone(_: object) -> None:
            gone.append(True)
            d.cancel()

        request.notifyFinish().addErrback(browser_gone)
        request.browser_gone = gone  # type: ignore[attr-defined]
        d.addCallbacks(self._respond, self._failed, callbackArgs=(request, host, secure),
                       errbackArgs=(request, service, timed_out))

    def _respond(self, response: IResponse, request: Request, host: bytes, secure: bool
                 ) -> None:
        if request.finished or getattr(request, "browser_gone", None):
            return
        rewritten = response_headers(
            pairs(response.headers), prefix=self.prefix,
            hub_host=host, secure=secure, sandbox=self.settings.sandbox)
        for name in rewritten.dropped_cookies:
            log.warn("node {node}: dropped a Set-Cookie for console cookie name {name!r}",
                     node=self.node, name=name)
        request.setResponseCode(response.code, response.phrase)
        for raw, value in rewritten.headers:
            request.responseHeaders.addRawHeader(raw, value)
        if (rewrites_html(rewritten.headers) and request.method != b"HEAD"
                and response.code not in (204, 304)
                and (not isinstance(response.length, int)
                     or response.length <= HTML_REWRITE_MAX)):
            # The page's length changes: set when it is complete (RewrittenBody).
            request.responseHeaders.removeHeader(b"content-length")
            prefix = self.prefix
            response.deliverBody(RewrittenBody(
                request, lambda page: rewrite_html(page, prefix), HTML_REWRITE_MAX))
            return
        if isinstance(response.length, int) and not request.responseHeaders.hasHeader(
                b"content-length"):
            # Agent keeps the length apart: the browser sees it (download progress),
            # and the body is sent as is, not chunked.
            request.setHeader(b"content-length", b"%d" % response.length)
        if request.method == b"HEAD" or response.code in (204, 304):
            response.deliverBody(BodyPump(request, discard=True))
            return
        response.deliverBody(BodyPump(request))

    def _failed(self, f: Failure, request: Request, service: str, timed_out: list[bool]
                ) -> None:
        if request.finished or getattr(request, "browser_gone", None):
            return
        if timed_out:
            code, text = http.GATEWAY_TIMEOUT, (
                f"node {self.node} did not answer within {self.settings.timeout:g} s")
        elif f.check(DeviceRefused):
            code, text = http.BAD_GATEWAY, (
                f"node {self.node} refused the connection to its {service} service "
                f"(is its web server running?)")
        elif f.check(ChannelRefused):
            value: Any = f.value
            code = (http.SERVICE_UNAVAILABLE if value.reason == OPEN_CONNECT_FAILED
                    else http.NOT_FOUND)
            text = str(value.text)
        elif f.check(ResponseFailed):
            code, text = http.BAD_GATEWAY, (
                f"node {self.node}'s {service} service did not answer with valid HTTP")
        else:
            log.failure("proxy to node {node}", f, node=self.node)
            code, text = http.BAD_GATEWAY, f"node {self.node} could not be reached"
        log.info("{actor} -> node {node} {service}: {code} {text}", actor=self.reach.actor,
                 node=self.node, service=service, code=code, text=text)
        request.write(send_error(request, code, text))
        request.finish()


def device_web_resource(reach: OperatorReach, node: str, *,
                        settings: ProxySettings | None = None,
                        clock: IReactorTime, browse: BrowseAudit | None = None) -> IResource:
    """The resource the core mounts at `/nodes/NAME/web/` for a signed-in operator.

    `browse` is shared by every request of the console (it remembers who browsed what
    recently); `settings` come from the config file's [web_proxy] section."""
    settings = settings or ProxySettings()
    return DeviceWebResource(reach, node, settings, clock,
                             browse or BrowseAudit(clock, settings.audit_interval))
