"""TLS toward a device's `https` forward, without certificate verification.

Devices present self-signed certificates nobody can check; what authenticates the
device is its SSH key on the tunnel the bytes travel through, so TLS here only
satisfies a device that will not speak plain HTTP (docs/web-proxy.md).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    def __init__(self) -> None:
        self._context = CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


@implementer(IStreamClientEndpoint)
class InsecureTLS:
    """`endpoint` with TLS on top that accepts whatever certificate the device shows
    (Twisted's wrapClientTLS, with the clock passed in: TLS batches its writes on it)."""

    def __init__(self, endpoint: Any, clock: IReactorTime) -> None:
        self.endpoint = endpoint
        self.clock = clock

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        tls = TLSMemoryBIOFactory(_Unverified(), True, protocolFactory, self.clock)
        connected: defer.Deferred[Any] = self.endpoint.connect(tls)
        return connected.addCallback(lambda protocol: protocol.wrappedProtocol)
