"""The monitoring intake's settings: the `[nsca]` config section, validated when built.

The config loader builds it from the file and the intake uses it as it is; a
bad value raises ValueError with a message the loader prefixes with `[nsca] `.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase

from attrs import field, frozen, validators

from hub.intake.nsca import METHOD_XOR, check_method
from hub.rules.names import is_valid_name


def _supported(_instance: object, _attribute: object, value: int) -> None:
    try:
        check_method(value)
    except ValueError as e:
        raise ValueError(f"encryption: {e}") from None


def _host_map(value: object) -> Mapping[str, tuple[str, ...]]:
    """`[nsca.hosts]`: node name -> host names (or globs) it may report for, lower-cased."""
    if not isinstance(value, Mapping):
        raise ValueError("hosts: expected a table of node = [host names]")
    hosts: dict[str, tuple[str, ...]] = {}
    for node, names in value.items():
        if not isinstance(node, str) or not is_valid_name(node):
            raise ValueError(f"hosts: {node!r} is not a valid node name")
        if not isinstance(names, list | tuple) or not all(
                isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"hosts: {node}: expected a list of host names, got {names!r}")
        hosts[node.lower()] = tuple(n.strip().lower() for n in names)
    return hosts


@frozen
class NSCASettings:
    """How the intake decrypts, checks and keeps NSCA results."""

    password: str = field(default="", repr=False)
    encryption: int = field(default=METHOD_XOR, validator=_supported)
    max_age: int = 30  # seconds a packet's timestamp may be off the hub's clock
    # Drop results whose host is neither the sending node's name nor mapped to it in `hosts`.
    strict_host: bool = True
    history: int = 100  # results kept per host/service
    # The --nsca TCP listener's connections: all together, and from one address.
    max_connections: int = field(default=128, validator=validators.ge(1))
    max_connections_per_source: int = field(default=32, validator=validators.ge(1))
    # [nsca.hosts]: the other hosts a node reports for in strict mode (globs allowed).
    hosts: Mapping[str, tuple[str, ...]] = field(factory=dict, converter=_host_map, hash=False)
    # Not in the config file: how long a connection may stall mid-packet.
    read_timeout: float = field(default=30.0, validator=validators.gt(0))

    def __attrs_post_init__(self) -> None:
        if self.max_age < 0 or self.history < 1:
            raise ValueError("max_age must be >= 0 and history >= 1")

    def may_report(self, node: str, host: str) -> bool:
        """Whether `node` may send a result for `host` ("" is the --nsca listener,
        which has no node: strict mode does not apply to it)."""
        if not self.strict_host or not node:
            return True
        host = host.lower()
        return host == node.lower() or any(
            fnmatchcase(host, pattern) for pattern in self.hosts.get(node.lower(), ()))
