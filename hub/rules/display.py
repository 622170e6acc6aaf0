"""How the hub shows times and keys to people, in tables and JSON alike.

Times are ISO-8601 in UTC to the second (`2026-12-02T03:04:05Z`): the same
text whatever the time zone of the machine the CLI runs on, sortable, and read
by every tool. Keys are OpenSSH SHA256 fingerprints (the same rule as
`hub.ssh.keys.fingerprint`, here without Conch for the CLI).
"""

from __future__ import annotations

import base64
import hashlib
import time


def iso_utc(t: float | None) -> str | None:
    """`2026-12-02T03:04:05Z` for a Unix time; None for none."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def sha256_fingerprint(blob: bytes | None) -> str | None:
    """OpenSSH's `SHA256:...` of a public key blob; None for none."""
    if blob is None:
        return None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"
