"""More real peers for the benchmarks: a hub with options, a device sshd, the nsca daemon.

Builds on `common.py` (which `throughput.py` owns): the same temporary-directory,
loopback-only, always-stopped shape, plus what the NSCA, gateway and tunnel
benchmarks need — extra hub listeners and config, restarts on a fixed port, a
raised open-file limit, and Debian's `nsca` daemon.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from common import (
    SSH,
    SSHD,
    TWISTD,
    Hub,
    ThrowawaySSHD,
    Tunnel,
    descendants,
    free_port,
    make_key,
    server_cpu,
    stop_process,
    wait_for,
)
from common import port_range as choose_port_range

NSCA = shutil.which("nsca") or "/usr/sbin/nsca"
SEND_NSCA = shutil.which("send_nsca") or "/usr/sbin/send_nsca"
LISTENING_RE = re.compile(r"callhomehub (\S+) listening on ([\d.]+):(\d+)")


def raise_nofile() -> None:
    """preexec_fn: lift the soft open-file limit to the hard one (as far as we may)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for limit in (1 << 20, 65536, want):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, want), max(limit, hard)))
            return
        except (ValueError, OSError):
            continue


def nofile_limit() -> int:
    """The hard open-file limit children get (root without CAP_SYS_RESOURCE cannot raise it)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


class HubProcess(Hub):
    """The hub with extra options and a config file, restartable on the same SSH port."""

    def __init__(self, workdir: Path, *, config: str = "", extra: Sequence[str] = (),
                 port_range: str | None = None, backlog: int = 0) -> None:
        super().__init__(workdir)
        self.extra = list(extra)
        self.range = port_range or choose_port_range()
        self.backlog = backlog
        self.ports: dict[str, int] = {}
        self._offset = 0
        if config:
            (self.data / "callhomehub.toml").write_text(config)
        self.cli("callhome-password", stdin=b"bench-callhome-password")

    def endpoint(self, port: int) -> str:
        extra = f":backlog={self.backlog}" if self.backlog else ""
        return f"tcp:{port}:interface=127.0.0.1{extra}"

    def start(self, port: int = 0) -> HubProcess:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        self.ports = {}
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "callhomehub",
             "--data", str(self.data), "--ssh", self.endpoint(port or self.port),
             "--metrics", "none", "--port-range", self.range, "--web", "none", "--workers", "1",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile)
        wait_for(self._all_listening, 60, "the hub to listen")
        self.port = self.ports["SSH"]
        return self

    def _all_listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"hub exited {self.proc.returncode}: {self.log_text()[-2000:]}")
        text = self.log_text()[self._offset:]
        for what, _host, port in LISTENING_RE.findall(text):
            self.ports[what] = int(port)
        wanted = 1 + sum(1 for a in self.extra if a in ("--nsca", "--netconf"))
        return len(self.ports) >= wanted

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)


class DeviceSSHD:
    """OpenSSH sshd standing for a device (or for a rendezvous server), several keys."""

    def __init__(self, workdir: Path, authorized: Iterable[str], extra: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = make_key(self.dir / "ssh_host_ed25519_key", "bench-device")
        auth = self.dir / "authorized_keys"
        auth.write_text("".join(line if line.endswith("\n") else line + "\n"
                                for line in authorized))
        auth.chmod(0o600)
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {auth}\nPidFile {self.dir / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
            "AllowTcpForwarding yes\nGatewayPorts yes\n" + extra)
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DeviceSSHD:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=log,
                                         preexec_fn=raise_nofile)
        wait_for(self._listening, 15, "sshd to listen")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {self.log.read_text(errors='replace')}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def close(self) -> None:
        stop_process(self.proc)


def approved_device(stack: contextlib.ExitStack, workdir: Path, hub: Hub,
                    operator_keys: Sequence[Path] = ()) -> tuple[DeviceSSHD, Tunnel]:
    """A throwaway sshd as node `bench` behind its call-home tunnel to `hub`, approved
    (the hub pinned its host key); it trusts the hub's management key and
    `operator_keys`. Stopped with `stack`."""
    device_key = make_key(workdir / "device_key", "bench")
    hub.register(device_key, workdir)
    mgmt = (hub.data / "keys" / "hub_mgmt_ed25519_key.pub").read_text()
    device = DeviceSSHD(workdir / "device",
                        [mgmt, *(Path(f"{key}.pub").read_text() for key in operator_keys)])
    stack.callback(device.close)
    device.start()
    tunnel = Tunnel(workdir, hub, device_key, device.port, "chacha20-poly1305@openssh.com",
                    None)
    stack.callback(tunnel.close)
    tunnel.start()
    approved = hub.cli("approve", "bench")
    if "pinned" not in approved:
        raise RuntimeError(f"approve did not pin the device host key: {approved}")
    return device, tunnel


class Rendezvous:
    """The hub's real peer for operators: a self-built rendezvous server, an OpenSSH sshd
    the device calls home to with `ssh -N -R 0:127.0.0.1:DEVPORT root@rendezvous`.

    Operators reach the device through it with `ssh -J root@rendezvous -p PORT
    root@localhost` (`jump`), or log in to it and run `ssh -p PORT root@localhost`
    there (`nested`), with the rendezvous host's own key and the device's host key
    pinned in its known_hosts. Stopped with `stack`."""

    def __init__(self, stack: contextlib.ExitStack, workdir: Path, device: DeviceSSHD,
                 device_key: Path, login_key: Path, operator_keys: Sequence[Path]) -> None:
        # IPv4 only: the device's forward then listens on 127.0.0.1 alone, where the
        # nested ssh and -J reach it, and needs no free port on ::1 as well.
        self.sshd = ThrowawaySSHD(workdir, device_key, *operator_keys,
                                  extra="AddressFamily inet\n")
        stack.callback(self.sshd.close)
        self.sshd.start()
        self.tunnel = Tunnel(workdir, self.sshd, device_key, device.port,
                             "chacha20-poly1305@openssh.com", None)
        stack.callback(self.tunnel.close)
        try:
            self.tunnel.start()
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nrendezvous sshd: {self.sshd.log_text()[-2000:]}") from e
        self.port, self.forward = self.sshd.port, self.tunnel.port
        known = workdir / "rendezvous_known_hosts"
        known.write_text(f"[localhost]:{self.forward} "
                         + Path(f"{device.host_key}.pub").read_text())
        self.inner_config = workdir / "rendezvous_ssh_config"
        self.inner_config.write_text(
            f"Host *\n  BatchMode yes\n  IdentitiesOnly yes\n  IdentityFile {login_key}\n"
            f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
            "  Compression no\n  ConnectTimeout 10\n")
        # The device's tunnel: what stays between connections (see settle).
        self.resident = set(self.sshd.pids())

    def nested(self, remote: str) -> str:
        """The command an operator logged in to the rendezvous runs to reach the device."""
        return shlex.join([SSH, "-F", str(self.inner_config), "-T", "-p", str(self.forward),
                           "root@localhost", remote])

    def cpu_seconds(self) -> float:
        """Every process of this sshd, those of connections that ended included (each
        reaped process's CPU, the nested ssh's too, is in its parent's children's time)."""
        assert self.sshd.proc is not None
        return server_cpu([self.sshd.proc.pid, *self.sshd.pids()])

    def settle(self) -> None:
        """Wait until the processes of connections that ended are reaped, so that
        `cpu_seconds` has their CPU."""
        wait_for(lambda: set(self.sshd.pids()) <= self.resident, 10,
                 "sshd to reap a connection's processes")


class NscaDaemon:
    """Debian's `nsca -f` (single- or multi-process) with a temporary config."""

    def __init__(self, workdir: Path, password: str, method: int, mode: str = "--single"
                 ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.port = free_port()
        self.command_file = self.dir / "nagios.cmd"
        self.command_file.touch()
        self.config = self.dir / "nsca.cfg"
        # Debian's defaults, except: our port, files and identity; append_to_file
        # so the (regular) command file is not truncated at every open.
        self.config.write_text(
            f"pid_file={self.dir / 'nsca.pid'}\nserver_port={self.port}\n"
            "server_address=127.0.0.1\nnsca_user=root\nnsca_group=root\ndebug=0\n"
            f"command_file={self.command_file}\n"
            f"alternate_dump_file={self.dir / 'nsca.dump'}\n"
            "aggregate_writes=0\nappend_to_file=1\nmax_packet_age=30\n"
            f"password={password}\ndecryption_method={method}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NscaDaemon:
        self.proc = subprocess.Popen([NSCA, "-f", "-c", str(self.config), self.mode],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._listening, 15, "nsca to listen")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"nsca exited {self.proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stored(self) -> int:
        with open(self.command_file, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def close(self) -> None:
        # --daemon forks a child per connection: those still serving go too.
        kids = descendants(self.proc.pid) if self.proc is not None else []
        stop_process(self.proc)
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
