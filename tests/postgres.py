"""A throwaway PostgreSQL server for the tests: Debian's binaries, a cluster in a
temp dir owned by an unprivileged user (the server refuses to run as root),
listening on a free loopback port, fsync off. Each test gets its own database.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "nobody"  # the server's system user when the tests run as root
ROLE = "callhomehub"  # the role the hub logs in as: owns its databases, no superuser
PASSWORD = "pg-s3cret"
SHARED = "registries"  # the database whose schemas are the tests' registries


def binaries() -> Path:
    """The newest installed PostgreSQL's bin dir, or a clear failure."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql:"
                           " install Debian's postgresql (./run-tests does)")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One server for the session; `database()` makes a fresh database."""

    def __init__(self) -> None:
        self.bin = binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="callhomehub-pg-"))
        self.port = free_port()
        self._names = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:
            entry = pwd.getpwnam(USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._as = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                        "--clear-groups", "--"]
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    def _run(self, *argv: str) -> None:
        result = subprocess.run([*self._as, *argv], capture_output=True, text=True,
                                cwd=self.dir, env={**os.environ, "LC_ALL": "C.UTF-8"})
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}{log}")

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1"
                   f" -c unix_socket_directories={self.dir} -c fsync=off"
                   " -c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "start")
        self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        self.admin(f"CREATE DATABASE {SHARED} OWNER {ROLE}")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str, user: str = ROLE, password: str = PASSWORD) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database, "postgres", ""), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def scalar(self, sql: str) -> object:
        """The first column of the first row of an administrator's query."""
        import psycopg

        with psycopg.connect(self.url("postgres", "postgres", ""), autocommit=True) as conn:
            row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
            return None if row is None else row[0]

    def database(self, own: bool = False) -> str:
        """The URL of a new empty registry: a schema of its own in a shared database
        (instant, where a database copies 7.5 MB), or with `own` a whole database.
        Both belong to the hub's role."""
        name = f"registry_{next(self._names)}"
        if own:
            self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
            return self.url(name)
        self.admin(f"CREATE SCHEMA {name} AUTHORIZATION {ROLE}", SHARED)
        return f"{self.url(SHARED)}?options=-csearch_path%3D{name}"
