"""The project's exception types.

Each is turned into a user-visible message in exactly one place: a CLI error
line, an SSH channel/exit message, an SSH disconnect reason or a start-up error.
"""


class HubError(Exception):
    """Base of every error callhomehub raises on purpose; str() is the user message."""


class ConfigError(HubError):
    """A bad option, config key or config value; the message names it."""


class RegistryError(HubError):
    """The registry refused a change; the message says why."""


class RegistryStopped(RegistryError):
    """A registry call made after the hub's registry thread stopped (the hub is
    stopping): background reads let it pass quietly, changes are not written."""


class RegistryBusy(RegistryError):
    """Another hub wrote the same rows at the same time (PostgreSQL): try again."""


class BatchBroken(RegistryError):
    """A write of a batch could not be undone alone (its savepoint is gone with the
    batch's transaction): nothing of the batch was committed."""


class NameTaken(RegistryError):
    """A node or user name is already held by someone else."""


class NotFound(RegistryError):
    """No node or user of that name."""


class BadKey(HubError):
    """A public key that cannot be parsed or is not allowed."""


class BadName(HubError):
    """A node or user name that does not follow the naming rules."""


class PortsExhausted(RegistryError):
    """The per-device port range has no free port left."""


class BadPassword(HubError):
    """A password the hub cannot store (bcrypt takes at most 72 bytes)."""
