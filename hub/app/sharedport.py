"""The SSH listener shared by the hub's worker processes (`--workers N`, N > 1).

Every process makes its own listening socket on the same address with
SO_REUSEPORT (and SO_REUSEADDR, as Twisted's own TCP ports do) and adopts it into
its reactor; the kernel spreads new connections over the sockets of the group.
A worker that dies takes its socket out of the group, so new connections go to
the others until it is back. Only `tcp:` endpoints can be shared this way.
"""

from __future__ import annotations

import socket
from typing import Any

from attrs import frozen
from twisted.application import service
from twisted.logger import Logger

log = Logger()

DEFAULT_BACKLOG = 50  # Twisted's default for tcp: endpoints


@frozen
class TcpListen:
    """What a `tcp:PORT[:interface=ADDRESS][:backlog=N]` endpoint asks for."""

    port: int
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.interface else socket.AF_INET

    def endpoint(self, port: int | None = None) -> str:
        """The endpoint string again, with `port` (the one bound for port 0)."""
        text = f"tcp:{self.port if port is None else port}"
        if self.interface:
            text += ":interface=" + self.interface.replace(":", "\\:")
        if self.backlog != DEFAULT_BACKLOG:
            text += f":backlog={self.backlog}"
        return text


def _split(description: str) -> list[str]:
    """Endpoint fields split at unescaped colons (`\\:` is a colon in a value)."""
    fields, current, escaped = [], "", False
    for ch in description:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append(current)
            current = ""
        else:
            current += ch
    fields.append(current)
    return fields


def parse_tcp_listen(description: str) -> TcpListen | None:
    """The TCP listener an endpoint describes, or None when it is another kind
    (`unix:`, `ssl:`, `systemd:`...) or uses options a shared socket does not
    carry over."""
    kind, *rest = _split(description)
    if kind != "tcp":
        return None
    values: dict[str, str] = {}
    positional = ["port", "backlog", "interface"]  # Twisted's order for tcp:
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq:
            if not positional:
                return None
            key, value = positional.pop(0), item
        elif key in positional:
            positional.remove(key)
        values[key] = value
    if set(values) - {"port", "backlog", "interface"} or "port" not in values:
        return None
    try:
        port = int(values["port"])
        backlog = int(values.get("backlog", DEFAULT_BACKLOG))
    except ValueError:
        return None
    if not 0 <= port <= 65535 or backlog < 1:
        return None
    return TcpListen(port, values.get("interface", ""), backlog)


def shared_socket(listen: TcpListen) -> socket.socket:
    """A listening socket others may bind beside (same user: the kernel's rule)."""
    sock = socket.socket(listen.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listen.interface or ("::" if listen.family == socket.AF_INET6 else ""),
                   listen.port))
        sock.listen(listen.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class SharedListenerService(service.Service):
    """The SSH listener of one process of the group; a bind error stops start-up
    with one line, as `ListenerService` does."""

    def __init__(self, description: str, listen: TcpListen, factory: Any, reactor: Any) -> None:
        self.description = description
        self.listen = listen
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None
        self.bound = listen.port

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        try:
            sock = shared_socket(self.listen)
        except OSError as e:
            raise SystemExit(f"callhomehub: cannot listen on {self.listen.endpoint()} "
                             f"({self.description}): {e}") from None
        with sock:  # the reactor holds its own duplicate
            self.bound = sock.getsockname()[1]
            self.port = self.reactor.adoptStreamPort(sock.fileno(), self.listen.family,
                                                     self.factory)
        log.info("callhomehub {what} listening on {host}:{port} (shared)",
                 what=self.description, host=self.listen.interface or "0.0.0.0",
                 port=self.bound)

    def endpoint(self) -> str:
        """Where the other processes of the group listen: the port actually bound."""
        return self.listen.endpoint(self.bound)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
