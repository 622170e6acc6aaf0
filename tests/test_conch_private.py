"""Tripwire: every private name of Twisted the hub relies on still exists.

A Twisted upgrade that drops or renames one fails here, naming the hub module
that needs it, instead of deep inside a key exchange or a bulk transfer.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.conch.ssh.transport import SSHCiphers, SSHClientTransport
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport

from hub.ssh.privates import TWISTED_PRIVATES, TwistedPrivate


def _client_transport() -> Iterator[object]:
    t = SSHClientTransport()
    t.makeConnection(StringTransport())
    yield t


def _tcp_connection() -> Iterator[object]:
    ours, theirs = socket.socketpair()
    try:
        yield tcp.Connection(ours, protocol.Protocol(), MemoryReactor())
    finally:
        ours.close()
        theirs.close()


def _tcp_port() -> Iterator[object]:
    port = tcp.Port(0, protocol.Factory(), interface="127.0.0.1", reactor=MemoryReactor())
    port.startListening()
    try:
        yield port
    finally:
        port.socket.close()


def _endpoint_service() -> Iterator[object]:
    yield StreamServerEndpointService(None, protocol.Factory())


def _mac_params() -> Iterator[object]:
    ciphers = SSHCiphers(b"none", b"none", b"hmac-sha2-256", b"hmac-sha2-256")
    ciphers.setKeys(b"", b"", b"", b"", b"k" * 64, b"k" * 64)
    yield ciphers.outMAC


# How to get an instance of each owner whose private is set per instance.
INSTANCES: dict[str, Callable[[], Iterator[object]]] = {
    "twisted.conch.ssh.transport:SSHClientTransport": _client_transport,
    "twisted.internet.tcp:Connection": _tcp_connection,
    "twisted.internet.tcp:Port": _tcp_port,
    "twisted.application.internet:StreamServerEndpointService": _endpoint_service,
    "twisted.conch.ssh.transport:_MACParams": _mac_params,
}


def _owner(spec: str) -> Any:
    module, _, qualname = spec.partition(":")
    found: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        found = getattr(found, part)
    return found


@pytest.mark.parametrize("private", TWISTED_PRIVATES,
                         ids=lambda p: f"{p.owner.rpartition(':')[2] or p.owner}.{p.name}")
def test_twisted_still_has(private: TwistedPrivate) -> None:
    try:
        owner = _owner(private.owner)
    except (ImportError, AttributeError):
        pytest.fail(f"Twisted no longer has {private.owner}, which {private.needed_by} "
                    f"relies on for {private.name}")
    if private.on_instance:
        assert private.owner in INSTANCES, f"no way to build a {private.owner} in this test"
        instances = INSTANCES[private.owner]()
        found = hasattr(next(instances), private.name)
        instances.close()
    else:
        found = hasattr(owner, private.name)
    assert found, (f"Twisted {private.owner} no longer has {private.name}, which "
                   f"{private.needed_by} relies on (see hub/ssh/privates.py)")


def test_each_needing_module_exists() -> None:
    for private in TWISTED_PRIVATES:
        for module in private.needed_by.split(", "):
            importlib.import_module(module)

