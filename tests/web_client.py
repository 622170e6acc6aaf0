"""The browser's side of the web console for the e2e tests and benches: a sign-in over
HTTP (`sign_in`) and a blocking WebSocket client (wsproto over a socket) for the web
terminal, with an Origin header like a browser's."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

SESSION_COOKIE = "__Host-chh-session"


def sign_in(port: int, user: str, password: str) -> str:
    """Sign in on the console at 127.0.0.1:`port` with a password; the `Cookie` header
    value that carries the session. The cookie is `Secure`: over plain http a client
    library's jar would drop it, so it is read from the Set-Cookie header here."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/signin", body=urlencode({"user": user, "password": password}),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        body = response.read()
        cookies: SimpleCookie = SimpleCookie()
        for value in response.headers.get_all("set-cookie") or []:
            cookies.load(value)
    finally:
        conn.close()
    morsel = cookies.get(SESSION_COOKIE)
    if response.status != 303 or morsel is None or not morsel.value:
        raise AssertionError(f"sign-in as {user} failed: {response.status} {body[:300]!r}")
    return f"{SESSION_COOKIE}={morsel.value}"


class Rejected(Exception):
    """The server answered the handshake with an HTTP status instead of a WebSocket."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"{status}: {body!r}")
        self.status = status
        self.body = body


class WebTerminalClient:
    """Opens `path` on 127.0.0.1:`port` (sending `cookie`, from `sign_in`); `screen`
    gathers the terminal bytes received, `control` the JSON messages, `closed` says
    whether the server closed."""

    def __init__(self, port: int, path: str, origin: str | None = None,
                 timeout: float = 30.0, cookie: str | None = None) -> None:
        host = f"127.0.0.1:{port}"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as browsers do
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.timeout = timeout
        self.screen = b""
        self.control: list[dict[str, Any]] = []
        self.closed = False
        headers = [(b"origin", (origin if origin is not None else f"http://{host}").encode())]
        if cookie is not None:
            headers.append((b"cookie", cookie.encode()))
        self.sock.sendall(self.ws.send(Request(host=host, target=path, extra_headers=headers)))
        status, body = 0, b""
        while True:
            events = self._events()
            for i, event in enumerate(events):
                if isinstance(event, AcceptConnection):
                    self._handle(events[i + 1:])  # what came with the acceptance
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise Rejected(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Rejected(status, body)

    def _events(self, wait: float | None = None) -> list[Any]:
        ready, _, _ = select.select([self.sock], [], [], self.timeout if wait is None else wait)
        if not ready:
            if wait is not None:
                return []
            raise TimeoutError("nothing from the server")
        data = self.sock.recv(1 << 20)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def pump(self, wait: float | None = None) -> None:
        """Take in what the server sent (waiting up to `wait`, default the timeout)."""
        self._handle(self._events(wait))

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, BytesMessage):
                self.screen += event.data
            elif isinstance(event, TextMessage):
                self.control.append(json.loads(event.data))
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.closed = True
                with contextlib.suppress(Exception):  # the server may be gone already
                    self.sock.sendall(self.ws.send(event.response()))

    def expect(self, text: bytes) -> bytes:
        """Wait until `text` is on the screen; return the screen up to it and consume it."""
        deadline = time.monotonic() + self.timeout
        while text not in self.screen:
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"never saw {text!r}; screen: {self.screen[-500:]!r}, "
                                     f"control: {self.control}")
            self.pump(max(0.0, deadline - time.monotonic()))
        cut = self.screen.index(text) + len(text)
        seen, self.screen = self.screen[:cut], self.screen[cut:]
        return seen

    def wait_closed(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.closed:
            if time.monotonic() > deadline:
                raise AssertionError(f"not closed; control: {self.control}")
            self.pump(max(0.0, deadline - time.monotonic()))

    def type(self, keys: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(keys)))

    def say(self, message: dict[str, Any]) -> None:
        self.sock.sendall(self.ws.send(TextMessage(json.dumps(message))))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closed already
            self.sock.sendall(self.ws.send(CloseConnection(1000)))
        self.sock.close()
