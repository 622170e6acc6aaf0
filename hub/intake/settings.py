"""The monitoring intake's settings: the `[nsca]` config section, validated when built.

The config loader builds it from the file and the intake uses it as it is; a
bad value raises ValueError with a message the loader prefixes with `[nsca] `.
"""

from __future__ import annotations

from attrs import field, frozen, validators

from hub.intake.nsca import METHOD_XOR, check_method


def _supported(_instance: object, _attribute: object, value: int) -> None:
    try:
        check_method(value)
    except ValueError as e:
        raise ValueError(f"encryption: {e}") from None


@frozen
class NSCASettings:
    """How the intake decrypts, checks and keeps NSCA results."""

    password: str = field(default="", repr=False)
    encryption: int = field(default=METHOD_XOR, validator=_supported)
    max_age: int = 30  # seconds a packet's timestamp may be off the hub's clock
    strict_host: bool = False  # drop results whose host is not the sending node
    history: int = 100  # results kept per host/service
    # The --nsca TCP listener's connections: all together, and from one address.
    max_connections: int = field(default=128, validator=validators.ge(1))
    max_connections_per_source: int = field(default=32, validator=validators.ge(1))
    # Not in the config file: how long a connection may stall mid-packet.
    read_timeout: float = field(default=30.0, validator=validators.gt(0))

    def __attrs_post_init__(self) -> None:
        if self.max_age < 0 or self.history < 1:
            raise ValueError("max_age must be >= 0 and history >= 1")
