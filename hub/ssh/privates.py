"""The private parts of Twisted the hub relies on, listed in one place.

Conch offers no public hook for what `hub.ssh` adds (strict kex, rekeying,
AEAD packets, writes that skip Twisted's queue), so the mixins override or
read some of its underscore names, and `writeNow` reads the TCP transport's
write queue.  Any Twisted release may rename them: pyproject.toml keeps
Twisted below its next major version, and tests/test_conch_private.py fails,
naming the hub module that needs it, as soon as one of these is missing.
Add an entry here whenever hub code starts to use another one.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class TwistedPrivate:
    """One private name: `owner` is a module (`"twisted.conch.ssh._kex"`) or a
    class in one (`"twisted.conch.ssh.transport:SSHTransportBase"`);
    `on_instance` when Twisted sets it on instances only (in `__init__` or
    `connectionMade`), not on the class."""

    owner: str
    name: str
    needed_by: str
    on_instance: bool = False


_TRANSPORT = "twisted.conch.ssh.transport:SSHTransportBase"
_CLIENT_TRANSPORT = "twisted.conch.ssh.transport:SSHClientTransport"
_USERAUTH_CLIENT = "twisted.conch.ssh.userauth:SSHUserAuthClient"
_TCP = "twisted.internet.tcp:Connection"
_ENDPOINT_SERVICE = "twisted.application.internet:StreamServerEndpointService"
_KEX = "twisted.conch.ssh._kex"

TWISTED_PRIVATES: tuple[TwistedPrivate, ...] = (
    # Key exchange state, kept by the transport mixin (strict kex, rekeying)
    # and honoured by its packet layer (packets wait during a key exchange).
    TwistedPrivate(_TRANSPORT, "_keyExchangeState", "hub.ssh.transport, hub.ssh.packetio"),
    TwistedPrivate(_TRANSPORT, "_KEY_EXCHANGE_NONE", "hub.ssh.transport, hub.ssh.packetio"),
    TwistedPrivate(_TRANSPORT, "_KEY_EXCHANGE_REQUESTED", "hub.ssh.transport"),
    TwistedPrivate(_TRANSPORT, "_allowedKeyExchangeMessageType",
                   "hub.ssh.transport, hub.ssh.packetio"),
    TwistedPrivate(_TRANSPORT, "_blockedByKeyExchange", "hub.ssh.transport, hub.ssh.packetio"),
    TwistedPrivate(_TRANSPORT, "_newKeys", "hub.ssh.transport"),
    TwistedPrivate(_CLIENT_TRANSPORT, "_gotNewKeys", "hub.ssh.transport", on_instance=True),
    # Cipher set-up, reused by the modern ciphers.
    TwistedPrivate("twisted.conch.ssh.transport:SSHCiphers", "_getCipher", "hub.ssh.ciphers"),
    TwistedPrivate("twisted.conch.ssh.transport:_MACParams", "key", "hub.ssh.ciphers",
                   on_instance=True),
    # Key exchange algorithm names.
    TwistedPrivate(_KEX, "getSupportedKeyExchanges", "hub.ssh.algorithms"),
    TwistedPrivate(_KEX, "isPQHybrid", "hub.ssh.algorithms, hub.ssh.transport"),
    TwistedPrivate(_KEX, "isDynamicPrimesGroup", "hub.access.server"),
    # User auth: RSA keys signed with SHA-2, and the hub's end of a login.
    TwistedPrivate(_USERAUTH_CLIENT, "_cbGetPublicKey", "hub.ssh.userauth"),
    TwistedPrivate(_USERAUTH_CLIENT, "_cbSignedData", "hub.ssh.userauth"),
    TwistedPrivate(_USERAUTH_CLIENT, "_cbSignData", "hub.ssh.userauth"),
    TwistedPrivate(_USERAUTH_CLIENT, "_ebAuth", "hub.ssh.userauth"),
    TwistedPrivate(_USERAUTH_CLIENT, "_log", "hub.ssh.userauth"),
    TwistedPrivate("twisted.conch.ssh.userauth:SSHUserAuthServer", "_cbFinishedAuth",
                   "hub.access.server"),
    # The host certificate: sent and signed for in place of the plain host key.
    TwistedPrivate("twisted.conch.ssh.transport:SSHServerTransport", "_getHostKeys",
                   "hub.ssh.hostcerts"),
    # The TCP write queue: writeNow sends at once only while it is empty.
    TwistedPrivate(_TCP, "_tempDataBuffer", "hub.ssh.tcpwrite", on_instance=True),
    TwistedPrivate(_TCP, "_tempDataLen", "hub.ssh.tcpwrite", on_instance=True),
    TwistedPrivate(_TCP, "dataBuffer", "hub.ssh.tcpwrite"),
    TwistedPrivate(_TCP, "offset", "hub.ssh.tcpwrite"),
    TwistedPrivate(_TCP, "_writeDisconnecting", "hub.ssh.tcpwrite"),
    TwistedPrivate(_TCP, "_writeDisconnected", "hub.ssh.tcpwrite"),
    TwistedPrivate(_TCP, "TLS", "hub.ssh.tcpwrite"),
    TwistedPrivate(_TCP, "socket", "hub.ssh.tcpwrite", on_instance=True),
    # A forward's port accepts as Twisted's Port.doRead does, less its per-accept
    # logger and the standard library's socket.accept wrapper.
    TwistedPrivate("twisted.internet.tcp:Port", "_buildAddr", "hub.tunnel.accept"),
    TwistedPrivate("twisted.internet.tcp:Port", "numberAccepts", "hub.tunnel.accept",
                   on_instance=True),
    TwistedPrivate("socket:socket", "_accept", "hub.tunnel.accept"),
    # The PROXY protocol header, read before SSH starts (Twisted's public wrapper would
    # start SSH first and stay in every read and write).
    TwistedPrivate("twisted.protocols.haproxy._v1parser", "V1Parser", "hub.access.proxyheader"),
    TwistedPrivate("twisted.protocols.haproxy._v2parser", "V2Parser", "hub.access.proxyheader"),
    TwistedPrivate("twisted.protocols.haproxy._exceptions", "InvalidProxyHeader",
                   "hub.access.proxyheader"),
    TwistedPrivate("twisted.protocols.haproxy._v1parser:V1Parser", "PROXYSTR",
                   "hub.access.proxyheader"),
    TwistedPrivate("twisted.protocols.haproxy._v2parser:V2Parser", "PREFIX",
                   "hub.access.proxyheader"),
    # A taken SSH port stops start-up with one line, not a traceback later.
    TwistedPrivate(_ENDPOINT_SERVICE, "_raiseSynchronously", "hub.app.lifecycle"),
    TwistedPrivate(_ENDPOINT_SERVICE, "_waitingForPort", "hub.app.lifecycle", on_instance=True),
)
