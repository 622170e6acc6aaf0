"""The bounds of the SSH server, set in the config file's `[limits]` section."""

from __future__ import annotations

from attrs import frozen

from hub.rules.ports import ForwardCaps


@frozen
class Limits:
    """Bounds that keep a hostile or broken peer from taking the hub down."""

    login_timeout: int = 120
    max_auth_tries: int = 6
    max_unauthenticated: int = 256
    # Failed-password back-off per source address (keys are never delayed,
    # so devices sharing one CGNAT address keep working).
    password_backoff_base: float = 1.0
    password_backoff_max: float = 30.0
    # Forwards a node may hold: a pending node is anyone with the shared Call
    # Home Password; its port leases are released after it stayed away
    # `pending_lease_expiry` seconds.
    max_forwards_pending: int = 3
    max_forwards: int = 16
    pending_lease_expiry: float = 86400.0

    def forward_caps(self) -> ForwardCaps:
        return ForwardCaps(pending=self.max_forwards_pending, approved=self.max_forwards)
