"""TLS toward a device's `https` forward, without certificate verification.

Devices present self-signed certificates nobody can check; what authenticates the
device is its SSH key on the tunnel the bytes travel through, so TLS here only
satisfies a device that will not speak plain HTTP (docs/web-proxy.md).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions
from zope.interface import implementer


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    def __init__(self) -> None:
        self._context = CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def insecure_tls(endpoint: Any) -> Any:
    """`endpoint` with TLS on top that accepts whatever certificate the device shows."""
    return wrapClientTLS(_Unverified(), endpoint)
