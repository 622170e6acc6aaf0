"""The Junos `outbound-ssh` preamble a NETCONF device may send before SSH.

A device calling home (RFC 8071) opens TCP to the hub and speaks SSH as the
server. Junos first writes a few text lines::

    MSG-ID: DEVICE-CONN-INFO
    MSG-VER: V1
    DEVICE-ID: router1
    HOST-KEY: ssh-ed25519 AAAA...          (only with a shared secret)
    HMAC: <hex HMAC-SHA1(secret, HOST-KEY value)>

then its SSH version line. `PreambleParser` is a sans-IO machine: bytes in,
a `PreambleResult` out once the SSH version line starts (`rest` holds the
bytes from there on, for the SSH client), a `PreambleError` for malformed,
oversized or slow input. When the very first bytes are `SSH-` there is no
preamble. `authenticate` checks the HMAC against the configured secrets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime

from hub.errors import HubError
from hub.rules.names import is_valid_name

MAX_PREAMBLE = 8 * 1024
PREAMBLE_TIMEOUT = 10.0
SSH_PREFIX = b"SSH-"
# OpenSSH allows 255 bytes for the version line; leave room for a partial one.
MAX_VERSION_LINE = 255
_KNOWN = ("MSG-ID", "MSG-VER", "DEVICE-ID", "HOST-KEY", "HMAC")


class PreambleError(HubError):
    """The bytes before SSH are not a usable preamble; the message says why."""


@frozen
class Preamble:
    device_id: str
    host_key: str | None = None  # the HOST-KEY value exactly as sent ("TYPE BASE64")
    hmac: str | None = None


@frozen
class PreambleResult:
    preamble: Preamble | None  # None: the device spoke SSH at once
    rest: bytes                # the SSH stream, from its version line on


def _clean(line: bytes) -> bytes:
    # Junos pads some fields with NULs; lines end in CRLF.
    return line.replace(b"\x00", b"").strip()


@define
class PreambleParser:
    """Reads the preamble (bounded in size and time) up to the SSH version line."""

    clock: IReactorTime
    max_bytes: int = MAX_PREAMBLE
    timeout: float = PREAMBLE_TIMEOUT
    started: float = field(init=False)
    _buf: bytes = field(init=False, default=b"")
    _fields: dict[str, str] = field(init=False, factory=dict)
    _pos: int = field(init=False, default=0)  # start of the first unparsed line
    done: bool = field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.started = self.clock.seconds()

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def expired(self) -> bool:
        return not self.done and self.clock.seconds() >= self.deadline

    def feed(self, data: bytes) -> PreambleResult | None:
        """More bytes from the device: a result, None for "need more", or PreambleError."""
        if self.done:
            raise PreambleError("the preamble was already read")
        if self.expired():
            raise PreambleError(f"no complete preamble within {self.timeout:g} s")
        self._buf += data
        while True:
            end = self._buf.find(b"\n", self._pos)
            line = self._buf[self._pos:] if end < 0 else self._buf[self._pos:end]
            start = self._pos + len(line) - len(line.lstrip(b"\x00\r\n\t "))
            head = self._buf[start:start + len(SSH_PREFIX)]
            if head == SSH_PREFIX:
                return self._finish(start)
            if end < 0:
                if SSH_PREFIX.startswith(head) and len(line) < MAX_VERSION_LINE:
                    self._check_size(self._pos)
                    return None  # maybe the start of the version line
                self._check_size(len(self._buf))
                return None
            self._line(_clean(line))
            self._pos = end + 1
            self._check_size(self._pos)

    def _check_size(self, used: int) -> None:
        if used > self.max_bytes:
            raise PreambleError(f"preamble longer than {self.max_bytes} bytes")

    def _line(self, line: bytes) -> None:
        if not line:
            return
        key, sep, value = line.partition(b":")
        name = key.strip().decode("ascii", "replace").upper()
        text = value.strip().decode("utf-8", "replace")
        if not self._fields and (not sep or name != "MSG-ID"):
            raise PreambleError(
                f"neither an SSH version line nor a DEVICE-CONN-INFO preamble: {line[:60]!r}")
        if not sep:
            raise PreambleError(f"malformed preamble line {line[:60]!r}")
        if name in self._fields:
            raise PreambleError(f"preamble field {name} given twice")
        if name in _KNOWN:
            self._fields[name] = text

    def _finish(self, ssh_start: int) -> PreambleResult:
        self.done = True
        rest = self._buf[ssh_start:]
        if not self._fields:
            return PreambleResult(None, rest)
        f = self._fields
        if f.get("MSG-ID") != "DEVICE-CONN-INFO":
            raise PreambleError(f"unknown preamble MSG-ID {f.get('MSG-ID')!r}")
        if f.get("MSG-VER") != "V1":
            raise PreambleError(f"unsupported preamble MSG-VER {f.get('MSG-VER')!r}")
        device_id = f.get("DEVICE-ID")
        if not device_id:
            raise PreambleError("preamble without DEVICE-ID")
        if not is_valid_name(device_id):
            raise PreambleError(f"DEVICE-ID {device_id!r} is not a valid node name")
        if ("HOST-KEY" in f) != ("HMAC" in f):
            raise PreambleError("preamble has one of HOST-KEY and HMAC without the other")
        return PreambleResult(Preamble(device_id, f.get("HOST-KEY"), f.get("HMAC")), rest)


def host_key_blob(text: str) -> bytes:
    """The SSH public key blob of a HOST-KEY value (`TYPE BASE64 [comment]` or `BASE64`)."""
    parts = text.split()
    encoded = parts[1] if len(parts) > 1 else (parts[0] if parts else "")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PreambleError("HOST-KEY is not a base64 SSH public key") from None
    if not blob:
        raise PreambleError("HOST-KEY is empty")
    return blob


def expected_hmac(secret: str, host_key: str) -> str:
    return hmac.new(secret.encode(), host_key.encode(), hashlib.sha1).hexdigest()


def authenticate(preamble: Preamble, secrets: Mapping[str, str]) -> bytes | None:
    """Check the preamble's HMAC; the host key blob it vouches for, or None.

    With a secret configured for the DEVICE-ID the HMAC is required; an HMAC
    for a device without a configured secret cannot be checked and is refused.
    """
    secret = secrets.get(preamble.device_id)
    if secret is None:
        lowered = {k.lower(): v for k, v in secrets.items()}
        secret = lowered.get(preamble.device_id.lower())
    if preamble.hmac is None or preamble.host_key is None:
        if secret is not None:
            raise PreambleError(f"device {preamble.device_id} sent no HOST-KEY/HMAC but a "
                                "secret is configured for it")
        return None
    if secret is None:
        raise PreambleError(f"device {preamble.device_id} sent an HMAC but no secret is "
                            "configured for it in [netconf.secrets]")
    # As bytes: compare_digest refuses str with non-ASCII characters (TypeError).
    if not hmac.compare_digest(expected_hmac(secret, preamble.host_key).encode(),
                               preamble.hmac.strip().lower().encode()):
        raise PreambleError(f"device {preamble.device_id}: wrong HMAC (shared secret mismatch)")
    return host_key_blob(preamble.host_key)
