"""The web console in memory: a real `Site` on the hub of tests/memory_hub.py, driven
with raw HTTP bytes through a StringTransport, on a MemoryReactorClock."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from attrs import define, field
from memory_hub import make_hub, start_factory
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from hub.access.auth import hash_password
from hub.app.context import Hub
from hub.web.sessions import COOKIE, SessionStore
from hub.web.site import console_site
from hub.web.weblinks import WebLinks

HOST = "hub.example"


@define
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        return found[0] if found else None

    def cookies(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie"]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def parse(raw: bytes) -> Response:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    body = rest
    if any(k.lower() == "transfer-encoding" and v == "chunked" for k, v in headers):
        body, data = b"", rest
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2:]
    return Response(status, headers, body)  # type: ignore[arg-type]


@define
class Browser:
    """One browser: keeps the session cookie the console sets."""

    console: Console
    address: str = "192.0.2.7"
    cookie: str | None = None
    last: Response | None = None
    jar: dict[str, str] = field(factory=dict)

    def request(self, method: str, path: str, body: bytes = b"", *,
                headers: dict[str, str] | None = None, raw: bytes | None = None,
                advance: float = 0) -> Response:
        hdrs = {"Host": HOST, "Connection": "close", **(headers or {})}
        if self.cookie is not None:
            hdrs["Cookie"] = f"{COOKIE.decode()}={self.cookie}"
        if body or method == "POST":
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
            hdrs["Content-Length"] = str(len(body))
        data = raw if raw is not None else (
            f"{method} {path} HTTP/1.1\r\n".encode()
            + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()).encode() + b"\r\n" + body)
        response = self.console.exchange(data, self.address, advance)
        for value in response.cookies():
            jar: SimpleCookie = SimpleCookie()
            jar.load(value)
            morsel = jar.get(COOKIE.decode())
            if morsel is not None:
                self.cookie = morsel.value or None
        self.last = response
        return response

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, form: dict[str, str] | None = None, **kw: Any) -> Response:
        from urllib.parse import urlencode

        return self.request("POST", path, urlencode(form or {}).encode(), **kw)

    def csrf(self, path: str = "/nodes") -> str:
        match = re.search(r'name="csrf" value="([^"]+)"', self.get(path).text)
        assert match, "no CSRF token on the page"
        return match.group(1)

    def sign_in(self, user: str, password: str) -> Response:
        return self.post("/signin", {"user": user, "password": password})


class Console:
    def __init__(self, tmp_path: Path, tls: bool = True, hub: Hub | None = None,
                 factory: Any = None) -> None:
        self.hub: Hub = hub or make_hub(tmp_path, MemoryReactorClock(), keepalive="0")
        self.clock: MemoryReactorClock = self.hub.clock  # type: ignore[assignment]
        self.factory = factory or start_factory(self.hub)
        self.port: int | None = 8443
        self.hub.weblinks = WebLinks(self.hub.calls, self.clock, None, tls,
                                     lambda: self.port)
        self.hub.web_sessions = SessionStore(self.hub.calls, self.clock, 1800, 43200)
        self.needs = self.hub.web_needs(self.factory.password_budget, self.factory.backoff, tls)
        self.site = console_site(self.needs)

    def add_operator(self, name: str, password: str, allow: list[str], admin: bool = False
                     ) -> None:
        self.hub.registry.add_user(name, hash_password(password.encode(), rounds=4), [],
                                   allow, "test", admin=admin)

    def add_node(self, name: str, state: str = "approved") -> None:
        registry = self.hub.registry
        registry.register(name, f"key-{name}".encode(), f"fp-{name}", "test")
        if state != "pending":
            registry.set_state(name, state, "test")

    def send(self, data: bytes, address: str) -> StringTransport:
        transport, _ = self.connect(data, address)
        return transport

    def connect(self, data: bytes, address: str) -> tuple[StringTransport, Any]:
        """Send one request on a new connection; the answer may come later."""
        peer = IPv4Address("TCP", address, 40000)
        proto = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer,
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
        proto.makeConnection(transport)
        proto.dataReceived(data)
        return transport, proto

    def exchange(self, data: bytes, address: str, advance: float = 0) -> Response:
        transport, proto = self.connect(data, address)
        for _ in range(100):
            if transport.value().endswith(b"0\r\n\r\n") or transport.disconnecting:
                break
            pull = proto._requestProducer  # a static file: pull its data
            if pull is not None and not proto._requestProducerStreaming:
                pull.resumeProducing()
                continue
            self.clock.advance(advance or 0.5)
        return parse(transport.value())

    def browser(self, address: str = "192.0.2.7") -> Browser:
        return Browser(self, address)
