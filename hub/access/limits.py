"""The bounds of the SSH server, set in the config file's `[limits]` section."""

from __future__ import annotations

from attrs import field, frozen

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
    # Before login (see hub.rules.admission): sshd's MaxStartups as
    # "start:rate:full", unauthenticated connections per source (more for a
    # source whose devices log in with keys), seconds to finish key exchange,
    # penalties for sources whose connections keep ending without a login.
    max_startups: str = "128:30:256"
    per_source_unauthenticated: int = 10
    per_device_source_unauthenticated: int = 100
    kex_grace: int = 10
    penalty_points: int = 10
    penalty_time: int = 60
    # Unauthenticated connections a penalized address may still have open at a time.
    penalty_trickle: int = 1
    # The hub's own host (a health check, a TCP proxy): no per-source cap, no penalty.
    penalty_exempt: tuple[str, ...] = field(default=("127.0.0.1", "::1"), converter=tuple)
    # bcrypt checks (password logins): token buckets per source and global.
    password_checks_burst: int = 6
    password_checks_per_minute: int = 20
    password_checks_global_burst: int = 20
    password_checks_global_per_minute: int = 240
    # Channels a peer may have open (or opening) on one connection: session
    # channels like sshd's MaxSessions (the registrar needs one or two), and
    # all channels together (jump-host forwards, the NSCA intake).
    max_sessions: int = 10
    max_channels: int = 64
    # Forwards a node may hold: a pending node is anyone with the shared Call
    # Home Password; its port leases are released after it stayed away
    # `pending_lease_expiry` seconds.
    max_forwards_pending: int = 3
    max_forwards: int = 16
    pending_lease_expiry: float = 86400.0

    def forward_caps(self) -> ForwardCaps:
        return ForwardCaps(pending=self.max_forwards_pending, approved=self.max_forwards)
