"""An in-memory hub, a device whose forwarded channels run a tiny HTTP server, and a
Site around the device web UI proxy: the pieces the proxy tests drive by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from memory_hub import make_hub, start_factory
from test_tunnels_memory import Device, RecordingReactor, register
from twisted.conch.ssh import channel
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from hub.access.reach import OperatorReach
from hub.app.context import Hub
from hub.rules.logins import OperatorLogin
from hub.rules.webproxy import ProxySettings
from hub.web.proxy import BrowseAudit, device_web_resource

Handler = Callable[[bytes], bytes | None]


class DeviceHTTP(channel.SSHChannel):
    """The device's web server on one forwarded channel: once a whole request is in,
    `handler` returns the raw response (None: never answer), written and then closed."""

    name = b"forwarded-tcpip"

    def __init__(self, handler: Handler, seen: list[bytes], **kw: Any) -> None:
        channel.SSHChannel.__init__(self, **kw)
        self.handler = handler
        self.seen = seen
        self.data = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep or self.answered:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) < length:
            return
        self.answered = True
        self.seen.append(self.data)
        response = self.handler(self.data)
        if response is not None:
            self.write(response)
            self.loseConnection()


def response(status: bytes = b"200 OK", headers: tuple[bytes, ...] = (), body: bytes = b""
             ) -> bytes:
    head = [b"HTTP/1.1 " + status, b"Content-Length: %d" % len(body), b"Connection: close",
            *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Lab:
    """A hub on a memory reactor, node `r1` approved and operator `alice` allowed `grants`."""

    def __init__(self, tmp_path: Path, grants: tuple[str, ...] = ("*",),
                 settings: ProxySettings | None = None) -> None:
        self.reactor = RecordingReactor()
        self.hub: Hub = make_hub(tmp_path, self.reactor, keepalive="0",
                                 **{"port-range": "50000-50099"})
        self.factory = start_factory(self.hub)
        self.key = register(self.hub, "r1")
        self.hub.registry.set_state("r1", "approved", "test")
        self.hub.registry.add_user("alice", None, [], list(grants), "test")
        self.reach = OperatorReach(self.hub.gateway_needs(), OperatorLogin("alice"),
                                   lambda: "203.0.113.7")
        self.browse = BrowseAudit(self.reactor, 600)
        self.settings = settings or ProxySettings()
        self.device: Device | None = None
        self.seen: list[bytes] = []  # the requests the device's web server got
        self.handler: Handler = lambda request: response(body=b"hello")

    def connect(self, *forwards: tuple[bytes, int]) -> Device:
        device = self.device = Device(self.factory, self.reactor, key=self.key)
        conn = device.conn

        def web(window: int, max_packet: int, data: bytes) -> DeviceHTTP:
            if conn.refuse_channels:
                from twisted.conch.error import ConchError

                raise ConchError("Connection refused", 2)
            return DeviceHTTP(lambda r: self.handler(r), self.seen, remoteWindow=window,
                              remoteMaxPacket=max_packet)

        conn.channel_forwarded_tcpip = web
        for bind, port in forwards:
            assert device.forward(bind, port)[0] == "ok"
        return device

    def site(self, node: str = "r1") -> Site:
        root, nodes, page = Resource(), Resource(), Resource()
        root.putChild(b"nodes", nodes)
        nodes.putChild(node.encode(), page)
        page.putChild(b"web", device_web_resource(
            self.reach, node, settings=self.settings, clock=self.reactor, browse=self.browse))
        return Site(root)

    def browser(self, raw: bytes, node: str = "r1", full: bool = False) -> Browser:
        """A browser that sends `raw`; `full`: its socket accepts nothing more."""
        return Browser(self, self.site(node), raw, full)

    def flush(self) -> None:
        if self.device is not None:
            self.device.pump.flush()


class BrowserSocket(StringTransport):
    """The hub's side of a browser's TCP connection. While `full`, every write pauses
    the registered producer, as Twisted's TCP transport does past its buffer size."""

    full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.full = False
        if self.producer is not None:
            self.producer.resumeProducing()


class Browser:
    """One HTTP connection to the Site, read from a StringTransport."""

    def __init__(self, lab: Lab, site: Site, raw: bytes, full: bool = False) -> None:
        self.lab = lab
        self.transport = BrowserSocket(peerAddress=IPv4Address("TCP", "203.0.113.7", 50123))
        self.protocol = site.buildProtocol(IPv4Address("TCP", "203.0.113.7", 50123))
        assert self.protocol is not None
        self.protocol.makeConnection(self.transport)
        self.transport.full = full
        self.protocol.dataReceived(raw)
        lab.flush()

    @property
    def text(self) -> bytes:
        return self.transport.value()

    def status(self) -> int:
        return int(self.text.split(b" ", 2)[1])

    def headers(self) -> list[tuple[bytes, bytes]]:
        head = self.text.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        return [(n.strip().lower(), v.strip()) for n, _, v in (h.partition(b":") for h in head)]

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers() if n == name.lower()]

    def body(self) -> bytes:
        return self.text.partition(b"\r\n\r\n")[2]
