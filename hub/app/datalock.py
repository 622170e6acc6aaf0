"""One hub per data directory: an exclusive lock on `DATA/hub.lock` while the hub runs.

Taken before the registry is touched, so a second `twistd callhomehub` on the same
directory stops with one line instead of first marking the running hub's nodes
offline. The admin CLI does not take it: it works beside the running hub.
"""

from __future__ import annotations

import fcntl
import os

from attrs import define
from twisted.application import service

from hub.errors import HubError

LOCK_NAME = "hub.lock"


@define(eq=False)
class DataLock:
    """The held lock; `release` (or the process ending) lets it go."""

    path: str
    fd: int | None

    @classmethod
    def take(cls, data: str) -> DataLock:
        path = os.path.join(data, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise HubError(f"--data {data}: cannot create {LOCK_NAME}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise HubError(f"--data {data}: another hub is running on this data directory"
                           f"{f' (pid {holder})' if holder else ''}; stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class DataLockService(service.Service):
    """Holds the lock for the service tree's life."""

    def __init__(self, lock: DataLock) -> None:
        self.lock = lock

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.lock.release()
