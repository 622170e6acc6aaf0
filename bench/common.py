"""Real peers for the benchmarks: a hub process, a throwaway sshd, `ssh -R` tunnels.

Everything here runs real programs on loopback in a temporary directory and is
torn down by `close()`; `/proc` probes read CPU time and peak RSS of a process
(or of a process tree, for sshd's per-connection children).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CLI = str(BIN / "callhomehub")


def cli_command() -> list[str]:
    """The admin CLI, from the export when `--hub-source` chose one (see runner.use_hub_source)."""
    module = os.environ.get("CALLHOMEHUB_BENCH_CLI")
    return [sys.executable, "-m", module] if module else [CLI]
SSH = shutil.which("ssh") or "ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "ssh-keygen"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LISTEN_RE = re.compile(r"callhomehub SSH listening on ([\d.]+):(\d+)")
ALLOCATED_RE = re.compile(r"Allocated port (\d+) for remote forward")
KEX_RE = re.compile(r"kex: client->server cipher: (\S+) MAC: (\S+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The throwaway hub's Call Home Password; it lives only as long as one run.
PASSWORD = "bench-callhome-password"  # noqa: S105

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(path: Path, comment: str) -> Path:
    """A fresh ed25519 key pair, generated for this run only."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10,
                 sig: int = signal.SIGTERM) -> None:
    """`sig` (SIGTERM; SIGINT makes a recorder such as py-spy or perf write its file),
    then SIGKILL if it does not go; always reaps it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- /proc probes ------------------------------------------------------------

def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    return sum(cpu_times(pid))


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of one process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def vm_rss_kib(pid: int) -> int:
    """Current resident set size (VmRSS) of one process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat.

    Busy is user, nice, system, irq and softirq; idle, iowait and steal are not.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy, sum(fields)


def busy_cores(interval: float) -> float:
    """How many CPUs' worth of work ran on the machine over `interval` seconds."""
    before = machine_ticks()[0]
    time.sleep(interval)
    return (machine_ticks()[0] - before) / CLK_TCK / interval


def wait_quiet(threshold: float, max_wait: float, interval: float = 0.5) -> float:
    """Wait until the machine runs less than `threshold` cores of work (others' work,
    when we are idle), at most `max_wait` seconds; return the last load seen."""
    deadline = time.monotonic() + max_wait
    load = busy_cores(interval)
    while load > threshold and time.monotonic() < deadline:
        load = busy_cores(interval)
    return load


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    """Direct children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def tree_cpu(pids: Iterable[int]) -> tuple[float, float]:
    """(user, system) CPU seconds summed over processes that still exist."""
    user = system = 0.0
    for pid in pids:
        try:
            u, s = cpu_times(pid)
        except OSError:
            continue
        user, system = user + u, system + s
    return user, system


def cpu_with_children(pid: int) -> float:
    """utime + stime + reaped children's cutime + cstime, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def server_cpu(pids: Iterable[int]) -> float:
    """CPU seconds of `pids` and of every child they reaped: given a server and its
    live descendants, this counts the per-connection processes (sshd's, nsca's) that
    already ended too, each once (in its parent once reaped, by itself while alive)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_with_children(pid)
    return total


def tree_max(probe: Callable[[int], int], pids: Iterable[int]) -> int:
    """The largest `probe(pid)` over processes that still exist."""
    peak = 0
    for pid in pids:
        try:
            peak = max(peak, probe(pid))
        except OSError:
            pass
    return peak


# -- the servers -------------------------------------------------------------

def port_range(count: int = 16) -> str:
    """Per-device ports for a bench hub with `count` tunnels: `tunnel_port_range`, or
    CALLHOMEHUB_BENCH_PORTS=LOW-HIGH when the operator of the bench knows better."""
    return os.environ.get("CALLHOMEHUB_BENCH_PORTS") or tunnel_port_range(count)


def listening_ports(low: int, high: int) -> set[int]:
    """TCP ports in [low, high] that something on this machine listens on."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "0A" and low <= port <= high:
                found.add(port)
    return found


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def tunnel_port_range(count: int) -> str:
    """A per-device port range for `count` tunnels that no client socket can take.

    Outside the kernel's ephemeral ports (where our own thousands of client
    connections get theirs), and of such ranges the one other programs listen on
    least: on a shared machine another benchmark's hub may hold thousands of ports,
    and each one it holds in our range costs our hub a failed listen, or a device
    its old port in the reconnect storm. Ties go to the first of 8192 and up,
    above the ephemeral ports, then 1024 and up (test suites crowd 49152 and up)."""
    eph_low, eph_high = ephemeral_range()
    size = count + 1280
    listening = sorted(listening_ports(1024, 65535))
    best: tuple[int, int] | None = None
    for low in window_starts(size, eph_low, eph_high):
        busy = bisect.bisect_right(listening, low + size - 1) - bisect.bisect_left(listening, low)
        if best is None or busy < best[0]:
            best = (busy, low)
    if best is None:
        raise RuntimeError(f"no {size} ports outside the ephemeral ports {eph_low}-{eph_high}")
    return f"{best[1]}-{best[1] + size - 1}"


def window_starts(size: int, eph_low: int, eph_high: int) -> list[int]:
    """Starts of `size`-port windows clear of the ephemeral ports, in order of preference."""
    def starts(low: int, high: int) -> list[int]:
        return list(range(low, high - size + 2, 256))
    return [*starts(8192, eph_low - 1), *starts(eph_high + 1, 65535),
            *starts(1024, min(8191 + size, eph_low - 1))]


class Hub:
    """`twistd -n callhomehub` on loopback with a registered bench device key."""

    name = "hub"
    user = "cms"

    def __init__(self, workdir: Path, extra: Sequence[str] = (), name: str = "hub") -> None:
        self.name = name
        self.extra = list(extra)
        self.data = workdir / "hub"
        self.data.mkdir()
        self.log = self.data / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> Hub:
        self.cli("callhome-password", stdin=PASSWORD.encode())
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "callhomehub",
             "--data", str(self.data), "--ssh", "tcp:0:interface=127.0.0.1", "--metrics", "none",
             "--port-range", port_range(), "--web", "none", "--workers", "1", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = int(wait_for(self._listening, 30, "the hub to listen"))
        return self

    def _listening(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"hub exited {self.proc.returncode}: {self.log_text()[-2000:]}")
        found = LISTEN_RE.search(self.log_text())
        return found.group(2) if found else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str, stdin: bytes = b"") -> str:
        result = subprocess.run([*cli_command(), "--data", str(self.data), *args], input=stdin,
                                capture_output=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"callhomehub {' '.join(args)}: {result.stderr.decode()}")
        return result.stdout.decode()

    def register(self, key: Path, workdir: Path) -> None:
        """`ssh cms@hub register bench < key.pub`, answering the password via askpass."""
        askpass = workdir / "askpass"
        askpass.write_text(f"#!/bin/sh\necho '{PASSWORD}'\n")
        askpass.chmod(0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        result = subprocess.run(
            [SSH, *client_options(self.port), "-o", "PubkeyAuthentication=no",
             "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
             "cms@127.0.0.1", "register", "bench"],
            input=Path(f"{key}.pub").read_bytes(), capture_output=True, env=env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"register failed: {result.stderr.decode()}")

    def pids(self) -> list[int]:
        """The processes whose CPU and memory count for this server: the hub and
        its helpers (the port keeper of `--port-keeper`)."""
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc is not None else []

    def close(self) -> None:
        stop_process(self.proc)


class ThrowawaySSHD:
    """OpenSSH sshd on loopback with its own config, host key and authorized keys."""

    name = "sshd"
    user = "root"

    def __init__(self, workdir: Path, authorized: Path, *also: Path, extra: str = "") -> None:
        self.dir = workdir / "sshd"
        self.dir.mkdir()
        self.port = free_port()
        host_key = make_key(self.dir / "ssh_host_ed25519_key", "bench-sshd")
        auth = self.dir / "authorized_keys"
        auth.write_text("".join(Path(f"{key}.pub").read_text() for key in (authorized, *also)))
        auth.chmod(0o600)
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {auth}\nPidFile {self.dir / 'sshd.pid'}\n"
            "GatewayPorts yes\nAllowTcpForwarding yes\nStrictModes no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n" + extra)
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ThrowawaySSHD:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=log)
        wait_for(self._listening, 15, "sshd to listen")
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {self.log_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def pids(self) -> list[int]:
        """sshd's per-connection processes (privileged monitor and session child)."""
        return descendants(self.proc.pid) if self.proc is not None else []

    def close(self) -> None:
        stop_process(self.proc)


def client_options(port: int) -> list[str]:
    """The ssh client isolated from the user's config, keys and known hosts."""
    return ["-F", "/dev/null", "-p", str(port), "-o", "UserKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=no", "-o", "ConnectTimeout=10",
            "-o", "IdentitiesOnly=yes", "-o", "Compression=no"]


class Tunnel:
    """`ssh -N -R 0:127.0.0.1:DEVPORT user@server` with one forced cipher (and MAC)."""

    def __init__(self, workdir: Path, server: Hub | ThrowawaySSHD, key: Path, dev_port: int,
                 cipher: str, mac: str | None) -> None:
        self.log = workdir / f"ssh-{server.name}-{cipher}.log"
        crypto = ["-o", f"Ciphers={cipher}"] + (["-o", f"MACs={mac}"] if mac else [])
        self.args = [SSH, *crypto, *client_options(server.port), "-v", "-N",
                     "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                     "-i", str(key), "-R", f"0:127.0.0.1:{dev_port}",
                     f"{server.user}@127.0.0.1"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> Tunnel:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        self.port = int(wait_for(self._allocated, 30, "the forward's allocated port"))
        return self

    def _allocated(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ssh -R exited {self.proc.returncode}: {self.log_text()[-2000:]}")
        found = ALLOCATED_RE.search(self.log_text())
        return found.group(1) if found else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def negotiated(self) -> tuple[str, str]:
        """Cipher and MAC the client reports for client->server."""
        found = KEX_RE.search(self.log_text())
        return (found.group(1), found.group(2)) if found else ("?", "?")

    def close(self) -> None:
        stop_process(self.proc)


class PySpy:
    """`py-spy record` of one process into a collapsed-stacks file, until closed."""

    def __init__(self, pid: int, output: Path, native: bool = False) -> None:
        exe = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.output = output
        args = [exe, "record", "--pid", str(pid), "--format", "raw", "--function",
                "--rate", "250", "--output", str(output)]
        self.proc = subprocess.Popen([*args, *(["--native"] if native else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def close(self) -> None:
        """SIGINT makes py-spy write its file and exit."""
        stop_process(self.proc, 30, signal.SIGINT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# -- machine info ------------------------------------------------------------

def _first_line(args: list[str]) -> str:
    try:
        result = subprocess.run(args, capture_output=True, timeout=10)
    except OSError as e:
        return f"unavailable ({e})"
    out = (result.stdout or result.stderr).decode(errors="replace").strip()
    return out.splitlines()[0] if out else "?"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def cpu_flags() -> list[str]:
    """The crypto-relevant CPU features (AES-NI, carry-less multiply, SHA, AVX)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return sorted(flags & {"aes", "pclmulqdq", "sha_ni", "avx", "avx2", "avx512f",
                                   "vaes", "vpclmulqdq"})
    return []


def source_state() -> dict[str, object]:
    """The commit the hub runs from and the files changed since (read-only git)."""
    root = Path(__file__).resolve().parent.parent
    head = _first_line(["git", "-C", str(root), "rev-parse", "HEAD"])
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                             "hub", "twisted"], capture_output=True, timeout=10)
    changed = [line[3:] for line in status.stdout.decode().splitlines()]
    return {"commit": head, "uncommitted": changed}


def machine_info() -> dict[str, object]:
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    import twisted

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "cryptography": cryptography.__version__,
        "cryptography_openssl": backend.openssl_version_text(),
        "openssh_client": _first_line([SSH, "-V"]),
        "openssh_server": _first_line([SSHD, "-V"]),
        "hub_source": source_state(),
    }
