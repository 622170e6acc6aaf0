"""Several hubs on one registry: hub ids, when a hub is dead, the address peers dial.

Pure values in and out; the heartbeat loop is `hub.cluster.heartbeat`.
"""

from __future__ import annotations

import re

# A hub writes its heartbeat this often (seconds) ...
HEARTBEAT = 5.0
# ... and is dead once this many heartbeats in a row are missing: a hub
# stalled for a moment (a long registry write, a GC pause) is not reclaimed,
# a killed one is within 15 s.
DEAD_AFTER = 3
# The heartbeat a hub writes as it stops (`Registry.hub_stopped`): dead at once.
STOPPED = 0.0

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ALL_INTERFACES = ("", "0.0.0.0", "::", "[::]")


def is_valid_hub_id(text: str) -> bool:
    """A hub id: a host name or a label (letters, digits, `.`, `_`, `-`; at most 63)."""
    return _HUB_ID.fullmatch(text) is not None


def is_live(heartbeat: float, now: float, interval: float = HEARTBEAT,
            beats: int = DEAD_AFTER) -> bool:
    """Whether a hub that last beat at `heartbeat` is alive at `now`."""
    return now - heartbeat <= interval * beats


def has_stopped(heartbeat: float) -> bool:
    """Whether a hub's heartbeat is the one it writes as it stops (`STOPPED`), not
    the last one of a hub that died."""
    return heartbeat <= STOPPED


def default_hub_id(hostname: str) -> str:
    """The host name, cut to what a hub id may hold."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", hostname).lstrip("._-")[:63]
    return cleaned or "hub"


def worker_hub_id(group: str, index: int) -> str:
    """The hub id of worker `index` of a hub whose `[cluster] id` is `group`."""
    suffix = f"-w{index}"
    return group[:63 - len(suffix)] + suffix


def is_sibling(group: str | None, hub_id: str) -> bool:
    """Whether `hub_id` is one of the workers of `group` (on this machine)."""
    return group is not None and re.fullmatch(
        re.escape(group[:60]) + r"[A-Za-z0-9._-]*-w\d+", hub_id) is not None


def worker_peer(configured_address: str | None) -> str:
    """The peer listener of a worker (index > 0): port 0 on the host of the
    configured peer address when it is an IP address (several machines), else
    on loopback (the workers of one machine)."""
    host = "127.0.0.1"
    if configured_address:
        candidate = split_address(configured_address)[0]
        if re.fullmatch(r"[0-9.]+|[0-9A-Fa-f:]+", candidate):
            host = candidate
    return f"tcp:0:interface={host.replace(':', chr(92) + ':')}"


def listens_everywhere(interface: str) -> bool:
    return interface.strip() in _ALL_INTERFACES


def peer_address(configured: str | None, host: str, port: int) -> str | None:
    """What other hubs dial: `[cluster] peer_address` as configured, else the
    listener's own address (None when it listens on every interface: peers
    could not tell which address reaches it)."""
    if configured:
        return configured
    if listens_everywhere(host):
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port); ValueError if it is neither."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", address.strip())
    if m is None:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not within 1-65535")
    return host, port
