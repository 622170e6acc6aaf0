"""A peer's SSH_MSG_DISCONNECT or channel-open refusal in words, and at the level it deserves.

Conch logs every disconnect a peer sends as an error with a bytes repr
(`Got remote error, code 11 reason: b'disconnected by user'`): every ordinary
`exit` of a client became an error line. Here a disconnect "by application"
(what OpenSSH sends when the user leaves) is info, anything else a warning.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import connection, transport
from twisted.logger import Logger

REASONS = {
    transport.DISCONNECT_HOST_NOT_ALLOWED_TO_CONNECT: "host not allowed to connect",
    transport.DISCONNECT_PROTOCOL_ERROR: "protocol error",
    transport.DISCONNECT_KEY_EXCHANGE_FAILED: "key exchange failed",
    transport.DISCONNECT_RESERVED: "reserved",
    transport.DISCONNECT_MAC_ERROR: "MAC error",
    transport.DISCONNECT_COMPRESSION_ERROR: "compression error",
    transport.DISCONNECT_SERVICE_NOT_AVAILABLE: "service not available",
    transport.DISCONNECT_PROTOCOL_VERSION_NOT_SUPPORTED: "protocol version not supported",
    transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE: "host key not verifiable",
    transport.DISCONNECT_CONNECTION_LOST: "connection lost",
    transport.DISCONNECT_BY_APPLICATION: "by application",
    transport.DISCONNECT_TOO_MANY_CONNECTIONS: "too many connections",
    transport.DISCONNECT_AUTH_CANCELLED_BY_USER: "auth cancelled by user",
    transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE: "no more auth methods available",
    transport.DISCONNECT_ILLEGAL_USER_NAME: "illegal user name",
}


def disconnect_text(code: int, description: bytes) -> str:
    """`disconnected by user (by application)`: the peer's words, then the code's."""
    words = description.decode("utf-8", "replace").strip()
    reason = REASONS.get(code, f"code {code}")
    return f"{words} ({reason})" if words else reason


def log_peer_disconnect(log: Logger, peer: str, code: int, description: bytes) -> None:
    """One line for a disconnect the peer sent: info when it simply left."""
    emit = log.info if code == transport.DISCONNECT_BY_APPLICATION else log.warn
    emit("{peer} disconnected: {why}", peer=peer, why=disconnect_text(code, description))


# The names OpenSSH gives the four reason codes of SSH_MSG_CHANNEL_OPEN_FAILURE.
OPEN_REASONS = {
    connection.OPEN_ADMINISTRATIVELY_PROHIBITED: "administratively prohibited",
    connection.OPEN_CONNECT_FAILED: "connect failed",
    connection.OPEN_UNKNOWN_CHANNEL_TYPE: "unknown channel type",
    connection.OPEN_RESOURCE_SHORTAGE: "resource shortage",
}


def open_failure_text(code: int, description: bytes | str) -> str:
    """`Connection refused (code 2, connect failed)`: the peer's words, then its code."""
    words = (description.decode("utf-8", "replace") if isinstance(description, bytes)
             else description).strip()
    name = OPEN_REASONS.get(code)
    code_words = f"code {code}, {name}" if name else f"code {code}"
    return f"{words} ({code_words})" if words else code_words


def open_failure_of(cause: Any) -> tuple[int | None, str]:
    """The reason code and the text of a refused channel open as Conch reports
    it (a ConchError carrying the peer's description and code); other causes
    have no code and their own text."""
    value, code = getattr(cause, "value", None), getattr(cause, "data", None)
    if isinstance(code, int) and isinstance(value, (bytes, str)):
        return code, open_failure_text(code, value)
    return None, str(cause)
