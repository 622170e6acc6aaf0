"""The bounds of the SSH server, set in the config file's `[limits]` section."""

from __future__ import annotations

from attrs import frozen


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
    # Channels a peer may have open (or opening) on one connection: session
    # channels like sshd's MaxSessions (the registrar needs one or two), and
    # all channels together (jump-host forwards, the NSCA intake).
    max_sessions: int = 10
    max_channels: int = 64
