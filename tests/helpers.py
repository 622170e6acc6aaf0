"""Helpers for end-to-end tests: a real hub process and the real OpenSSH client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CLI = str(BIN / "callhomehub")
SSH = shutil.which("ssh")
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
LISTEN_RE = re.compile(r"callhomehub (\S+) listening on ([\d.]+):(\d+)")


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
             ) -> object:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral ports: every `tcp:0` listener and client socket gets one."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except OSError:
        return 32768, 60999  # Linux's default


def worker() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker; (0, 1) in a run without -n."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not name.startswith("gw"):
        return 0, 1
    return int(name[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def sdt_port_range(span: int = 8192) -> tuple[int, int]:
    """The per-device (SDT) ports for hubs this test process starts.

    Below the kernel's ephemeral ports, so no client socket, `tcp:0` listener or
    free_port() lands on a port a test expects a device to get back, and clear of the
    default 49152-65535 that hubs of other runs on the machine (and the bench, at the
    top) lease from. Each xdist worker gets its own slice: a worker's hubs never
    take, and its port scans never see, another worker's ports."""
    index, count = worker()
    top = ephemeral_range()[0] - 1
    if top - span < 1024:  # a kernel with ephemeral ports from (nearly) 1024 up
        top, span = 65535, 65536 - 49152
    size = span // count
    assert size >= 256, f"no room for {count} workers' port ranges"
    high = top - index * size
    return high - size + 1, high


class HubProcess:
    """`twistd -n callhomehub` on loopback, in its own data directory, leasing
    per-device ports from this test process's own range (sdt_port_range) unless
    the test gives --port-range."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.data = data
        self.extra = extra
        self.log = data / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def start(self, ssh_endpoint: str = "tcp:0:interface=127.0.0.1") -> HubProcess:
        self.data.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.ports = {}
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "callhomehub",
             "--data", str(self.data), "--ssh", ssh_endpoint, "--metrics", "none", "--web", "none",
             "--workers", "1", *self.port_range(), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"hub exited {self.proc.returncode}: {self.proc.stderr.read().decode()}"  # type: ignore[union-attr]
                    + self.log_text()[offset:])
            text = self.log_text()[offset:]
            for what, _host, port in LISTEN_RE.findall(text):
                self.ports[what] = int(port)
            return all(what in self.ports for what in self.listeners())

        # A hub that exits is reported at once; one still starting on a machine
        # loaded ten-fold (key generation, imports) is given its time.
        try:
            wait_for(listening, 60, "the hub to listen")
        except BaseException:
            self.stop()  # not left running behind the failed test
            raise
        return self

    def listeners(self) -> list[str]:
        """The TCP listeners this hub's options ask for (the test waits for each)."""
        wanted = ["SSH"]
        args = list(self.extra)
        for option, what in (("--web", "web"), ("--metrics", "metrics"), ("--nsca", "NSCA"),
                             ("--netconf", "NETCONF")):
            if option in args:
                value = args[len(args) - 1 - args[::-1].index(option) + 1]  # the last one
                if value != "none" and not value.startswith("unix:"):
                    wanted.append(what)
        return wanted

    def port_range(self) -> list[str]:
        if "--port-range" in self.extra:
            return []
        low, high = sdt_port_range()
        return ["--port-range", f"{low}-{high}"]

    @property
    def port(self) -> int:
        return self.ports["SSH"]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def set_callhome_password(self, password: str) -> None:
        """What `callhomehub callhome-password` does, in this process and at bcrypt's
        lowest cost: the CLI's cost 12 takes a third of a second of CPU to set and again
        for each device that registers, and most tests start a hub (the CLI command has
        its own tests)."""
        from hub.access.auth import CALLHOME_PASSWORD, hash_password
        from hub.store.registry import Registry

        self.data.mkdir(parents=True, exist_ok=True)
        registry = Registry(str(self.data / "hub.sqlite3"), now=time.time)
        try:
            registry.set_setting(CALLHOME_PASSWORD, hash_password(password.encode(), rounds=4),
                                 "test")
        finally:
            registry.close()

    def cli(self, *args: str, stdin: bytes = b"", check: bool = True
            ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([CLI, "--data", str(self.data), *args], input=stdin,
                                capture_output=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"callhomehub {args} failed: {result.stderr.decode()}")
        return result


class SSHClient:
    """The real OpenSSH client, isolated from the user's config and keys."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        workdir.mkdir(parents=True, exist_ok=True)
        self.known_hosts = workdir / "known_hosts"

    def base(self, *, password: str | None = None, key: Path | None = None) -> list[str]:
        args = [SSH or "ssh", "-F", "/dev/null", "-p", str(self.port),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10", "-o", "IdentitiesOnly=yes"]
        if password is not None:
            args += ["-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1",
                     "-o", "PreferredAuthentications=password"]
        else:
            args += ["-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
                     "-o", "KbdInteractiveAuthentication=no"]
        if key is not None:
            args += ["-i", str(key)]
        return args

    def env(self, password: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
        # A DISPLAY lets tests ask for X11 forwarding; BatchMode keeps askpass unused.
        env["DISPLAY"] = ":0"
        if password is not None:
            # One script per password, written once and renamed into place:
            # rewriting it while another ssh runs it fails with ETXTBSY.
            import hashlib
            script = self.workdir / f"askpass-{hashlib.sha1(password.encode()).hexdigest()}"
            if not script.exists():
                tmp = script.with_suffix(f".{os.getpid()}.{threading.get_ident()}")
                tmp.write_text(f"#!/bin/sh\nprintf '%s\\n' '{password}'\n")
                tmp.chmod(0o700)
                os.replace(tmp, script)
            env.update(SSH_ASKPASS=str(script), SSH_ASKPASS_REQUIRE="force")
        return env

    def run(self, target: str, *command: str, password: str | None = None,
            key: Path | None = None, stdin: bytes = b"", options: Sequence[str] = (),
            timeout: float = 30, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        # Options first: for ssh the first value given for an option wins.
        base = self.base(password=password, key=key)
        args = [base[0], *options, *base[1:], target, *command]
        return subprocess.run(args, input=stdin, capture_output=True, timeout=timeout,
                              env={**self.env(password), **(env or {})})

    def popen(self, target: str, *command: str, key: Path | None = None,
              options: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        base = self.base(key=key)
        args = [base[0], *options, *base[1:], target, *command]
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env(None))


def make_key(path: Path, comment: str = "", kind: str = "ed25519") -> Path:
    """A fresh OpenSSH key pair generated at test time (never committed)."""
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
    if kind == "rsa":
        args[4:4] = ["-b", "3072"]
    subprocess.run(args, check=True, capture_output=True)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DeviceSSHD:
    """A real OpenSSH sshd playing the device, with its own config in a temp dir."""

    def __init__(self, workdir: Path, authorized: Sequence[Path], extra_config: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = make_key(self.dir / "ssh_host_ed25519_key", "device-host")
        auth = self.dir / "authorized_keys"
        auth.write_text("".join(Path(f"{k}.pub").read_text() if Path(f"{k}.pub").exists()
                                else Path(k).read_text() for k in authorized))
        auth.chmod(0o600)
        self.config = self.dir / "sshd_config"
        # root's shells on the device start in a home of their own: the machine's
        # root dotfiles (a .bashrc running `pyenv rehash`, say) stay out of the tests.
        # Other users (enroll's) keep theirs. sshd takes the first SetEnv that applies,
        # so the caller's global variables go into both Match blocks, after its own.
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        setenv: list[str] = []
        lines = []
        for line in extra_config.splitlines(keepends=True):
            if line.startswith("SetEnv "):
                setenv += line.split()[1:]
            else:
                lines.append(line)
        extra_config = "".join(lines)
        if extra_config and not extra_config.endswith("\n"):
            extra_config += "\n"
        extra_config += f"Match User root\n  SetEnv HOME={' '.join([str(home), *setenv])}\n"
        if setenv:
            extra_config += f"Match all\n  SetEnv {' '.join(setenv)}\n"
        self.config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {auth}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
            "AllowTcpForwarding yes\nLogLevel VERBOSE\n" + extra_config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "sshd.log"

    def start(self) -> DeviceSSHD:
        if SSHD is None:
            import pytest
            pytest.skip("OpenSSH sshd is not installed")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))

        def listening() -> bool:
            import socket
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sshd exited: {self.log.read_text()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        try:
            wait_for(listening, 10, "sshd to listen")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_port(hub: HubProcess) -> int:
    """The port of a hub's `--metrics tcp:0:...` listener, from its log."""
    def found() -> int | None:
        ports = {what: int(port) for what, _host, port in LISTEN_RE.findall(hub.log_text())}
        return ports.get("metrics")

    return int(wait_for(found, 10, "the metrics listener"))


def scrape(port: int) -> Samples:
    """`/metrics` over HTTP, each sample by name and labels."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]
