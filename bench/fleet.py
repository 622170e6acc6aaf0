"""Device keys for many devices and the load-generator process that holds their tunnels.

The keys are made in-process with `cryptography` (ed25519, one per device) and
written as JSON lines for `tunnel_load.py`; their public halves are written
straight into the hub's registry (`Registry.register`, what `ssh cms@hub
register` ends in) so that 10,000 devices need not each run the password
login. `Generator` runs `tunnel_load.py` (or its libssh2 twin, `tunnel_load_c.py`)
and follows its JSON reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import stop_process
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peers import raise_nofile

HERE = Path(__file__).resolve().parent
Event = dict[str, Any]
# --generator: the load generator's script per SSH client library. libssh2's
# handshake is C, asyncssh's Python (as costly as the hub's on the same cores).
GENERATORS = {"asyncssh": "tunnel_load.py", "libssh2": "tunnel_load_c.py"}


def make_keys(path: Path, count: int) -> list[tuple[str, str]]:
    """`count` device keys into `path`; returns (name, public key line) per device."""
    publics = []
    with open(path, "w") as out:
        for i in range(count):
            name = f"dev{i:05d}"
            key = Ed25519PrivateKey.generate()
            private = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()).decode()
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH).decode()
            out.write(json.dumps({"name": name, "key": private}) + "\n")
            publics.append((name, f"{public} {name}"))
    return publics


def register_all(database: Path, publics: list[tuple[str, str]]) -> float:
    """Write the devices into the hub's registry (hub stopped); seconds it took."""
    from hub.ssh.keys import parse_public_key
    from hub.store.registry import Registry

    start = time.perf_counter()
    registry = Registry(str(database), time.time)
    try:
        for name, line in publics:
            key = parse_public_key(line.encode())
            registry.register(name, key.blob, key.fingerprint, "bench")
    finally:
        registry.close()
    return time.perf_counter() - start


class Generator:
    """`tunnel_load.py` (or its twin named by `generator`) as a child process, its
    reports collected by a thread."""

    def __init__(self, port: int, keys: Path, user: str, concurrency: int, jitter: float,
                 backoff_max: float, storm_concurrency: int, log: Path,
                 algorithms: list[str] | None = None, service: str | None = None,
                 generator: str = "asyncssh") -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / GENERATORS[generator]), "--port", str(port),
                 "--keys", str(keys), "--user", user, "--concurrency", str(concurrency),
                 "--jitter", str(jitter), "--backoff-max", str(backoff_max),
                 "--storm-concurrency", str(storm_concurrency), *(algorithms or []),
                 *(["--service", service] if service else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                preexec_fn=raise_nofile)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait(self, match: Callable[[Event], bool], timeout: float) -> Event | None:
        """The first report matching `match` (waiting up to `timeout`), else None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for event in self.events[seen:]:
                    if match(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(left, 1.0))

    def latest(self) -> Event:
        with self._cond:
            return self.events[-1] if self.events else {}

    def close(self) -> None:
        """Stdin EOF asks it to close every connection; SIGTERM if it does not go."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
