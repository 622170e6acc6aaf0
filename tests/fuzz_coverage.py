"""Coverage-guided fuzz targets (atheris, libFuzzer's engine) for what a peer can send.

The targets are the checks of tests/fuzz_targets.py (no traceback in the log, no
exception out of a parser but its own, a connection dropped after a protocol error);
here libFuzzer mutates bytes, guided by the branches they reach in `hub` and Conch,
and each target decodes the bytes into its check's arguments. Most inputs are a list
of frames, each a 2-byte length and that many bytes (`pack_frames`), so a mutation
can grow, cut or swap one SSH message, NSCA chunk or typed line; `seeds` gives a
small valid corpus per target to start from.

    python tests/fuzz_coverage.py TARGET [libFuzzer flags] [CORPUS_DIR ...]

runs one target in this process (libFuzzer owns the process and instruments the
target's modules, so a target gets a process of its own); `run_target` does that
in a subprocess and reads libFuzzer's figures. tests/test_fuzz_coverage.py runs each
target for a few seconds; bench/fuzz_coverage.py as long as it is told.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs

HERE = Path(__file__).resolve().parent
# What each target instruments for coverage: the code a peer's bytes reach (the hub's
# SSH layers and the Conch modules they hand packets to; a parser's own module).
# Instrumenting costs start-up time (all of `hub` and Conch's SSH: about 12 s of CPU),
# so each target takes only its part.
_CONCH = ["twisted.conch.ssh.transport", "twisted.conch.ssh.connection",
          "twisted.conch.ssh.userauth", "twisted.conch.ssh.channel", "twisted.conch.ssh.common"]
_SSH_SERVER = ["hub.ssh", "hub.access.server", "hub.access.auth", "hub.access.gatekeeper",
               "hub.access.registrar", "hub.access.gateway", "hub.access.session", *_CONCH]
_SSH_CLIENT = ["hub.ssh", "hub.access.device_client", *_CONCH]
INSTRUMENTED = {
    "ssh-server-before-kex": _SSH_SERVER, "ssh-server-framing": _SSH_SERVER,
    "ssh-user-auth": _SSH_SERVER, "ssh-connection-layer": [*_SSH_SERVER, "hub.ssh.wire"],
    "ssh-client-before-kex": _SSH_CLIENT, "ssh-client-after-login": _SSH_CLIENT,
    "nsca-packets": ["hub.intake.nsca"], "nsca-any-method": ["hub.intake.nsca"],
    "netconf-preamble": ["hub.netconf.preamble"],
    "login-names": ["hub.rules.logins", "hub.rules.names"], "chooser": ["hub.rules.chooser"],
}
TARGETS = tuple(INSTRUMENTED)
MAX_FRAMES = 8


def pack_frames(items: list[bytes]) -> bytes:
    return b"".join(struct.pack(">H", len(item)) + item for item in items)


def frames(data: bytes, limit: int = MAX_FRAMES) -> list[bytes]:
    """The inverse of `pack_frames`; a length past the end takes what is left."""
    out, at = [], 0
    while at < len(data) and len(out) < limit:
        size = int.from_bytes(data[at:at + 2], "big")
        out.append(data[at + 2:at + 2 + size])
        at += 2 + size
    return out


def text(data: bytes) -> str:
    return data.decode("utf-8", "replace")  # names reach the hub as valid text


def build(name: str) -> Callable[[bytes], None]:
    """The target `name`: bytes in, an exception out when it finds a bug."""
    from fuzz_peers import new_hub
    from fuzz_targets import (
        NSCA_PLAIN,
        check_chooser,
        check_login,
        check_nsca,
        check_preamble,
        check_ssh_after_kex,
        check_ssh_before_kex,
        check_ssh_client_after_login,
        check_ssh_client_before_kex,
        check_ssh_framing,
    )

    from hub.intake.nsca import supported_methods

    if name.startswith(("ssh-server", "ssh-user", "ssh-connection")):
        _hub, clock, factory, key = new_hub(Path(tempfile.mkdtemp(prefix="fuzz-hub-")))

    def messages(data: bytes) -> list[bytes]:
        return [m for m in frames(data) if m]  # a message has at least its number

    methods = supported_methods()
    table: dict[str, Callable[[bytes], None]] = {
        "ssh-server-before-kex": lambda d: check_ssh_before_kex(factory, frames(d) or [b""]),
        "ssh-server-framing": lambda d: check_ssh_framing(factory, d),
        "ssh-client-before-kex": lambda d: check_ssh_client_before_kex(frames(d) or [b""]),
        "ssh-user-auth": lambda d: check_ssh_after_kex(factory, clock, key, None,
                                                       messages(d)),
        "ssh-connection-layer": lambda d: check_ssh_after_kex(
            factory, clock, key, b"cms", messages(d[1:]), session_first=d[:1] == b"\x01"),
        "ssh-client-after-login": lambda d: check_ssh_client_after_login(messages(d)),
        "nsca-packets": lambda d: check_nsca(NSCA_PLAIN, b"", bytes(128), frames(d)),
        "nsca-any-method": lambda d: _nsca_any(check_nsca, methods, d),
        "netconf-preamble": lambda d: check_preamble(frames(d)),
        "login-names": lambda d: _login(check_login, d),
        "chooser": lambda d: _chooser(check_chooser, d),
    }
    return table[name]


def _nsca_any(check: Callable[..., None], methods: list[int], data: bytes) -> None:
    method = methods[data[0] % len(methods)] if data else methods[0]
    parts = frames(data[1:], MAX_FRAMES + 2)
    password = parts[0][:16] if parts else b""
    iv = (parts[1] if len(parts) > 1 else b"").ljust(128, b"\0")[:128]
    check(method, password, iv, parts[2:])


def _login(check: Callable[..., None], data: bytes) -> None:
    parts = [text(p) for p in frames(data, 6)] or [""]
    check(parts[0], parts[1:-1], parts[-1])


def _chooser(check: Callable[..., None], data: bytes) -> None:
    parts = frames(data) or [b""]
    entries = [(text(line[1:]), bool(line[:1] == b"+")) for line in parts[0].split(b"\n")
               if line][:12]
    check(entries, parts[1:])


def seeds(name: str) -> list[bytes]:
    """A few well-formed inputs of target `name`: a corpus to start from."""
    from fuzz_targets import SESSION_OPEN, _nsca_packet
    from twisted.conch.ssh.common import NS

    def msg(number: int, body: bytes = b"") -> bytes:
        return bytes((number,)) + body

    kexinit = msg(20, bytes(16) + b"".join(NS(x) for x in [
        b"curve25519-sha256,kex-strict-c-v00@openssh.com", b"ssh-ed25519",
        b"chacha20-poly1305@openssh.com", b"chacha20-poly1305@openssh.com",
        b"hmac-sha2-256", b"hmac-sha2-256", b"none", b"none", b"", b""]) + b"\0" + bytes(4))
    transport = [[kexinit], [kexinit, msg(30, NS(bytes(32)))], [msg(21)],
                 [msg(5, NS(b"ssh-userauth"))], [msg(2, NS(b"x")), msg(4, b"\0" + NS(b"m"))],
                 [msg(3, bytes(4)), msg(1, bytes(4) + NS(b"bye") + NS(b""))]]
    auth = [[msg(50, NS(b"cms") + NS(b"ssh-connection") + NS(b"none"))],
            [msg(50, NS(b"alice:site-a:2") + NS(b"ssh-connection") + NS(b"password")
                 + b"\0" + NS(b"secret"))],
            [msg(50, NS(b"cms") + NS(b"ssh-connection") + NS(b"publickey") + b"\0"
                 + NS(b"ssh-ed25519") + NS(b"x"))]]
    tcpip = NS(b"site-a") + struct.pack(">L", 22) + NS(b"127.0.0.1") + struct.pack(">L", 4)
    window = struct.pack(">3L", 0, 65536, 32768)
    channel = [
        [msg(90, NS(b"direct-tcpip") + window + tcpip)],
        [msg(80, NS(b"tcpip-forward") + b"\1" + NS(b"localhost") + struct.pack(">L", 0))],
        [msg(80, NS(b"keepalive@openssh.com") + b"\1"), msg(80, NS(b"no-more-sessions"))],
        [msg(98, bytes(4) + NS(b"exec") + b"\1" + NS(b"register site-b"))],
        [msg(98, bytes(4) + NS(b"pty-req") + b"\1" + NS(b"xterm") + bytes(16) + NS(b"")),
         msg(94, bytes(4) + NS(b"ls\n")), msg(93, bytes(8)), msg(96, bytes(4)),
         msg(97, bytes(4))],
    ]
    parts: dict[str, list[list[bytes]]] = {
        "ssh-server-before-kex": transport, "ssh-client-before-kex": transport,
        "ssh-user-auth": auth,
        "ssh-client-after-login": [[msg(90, NS(b"forwarded-tcpip") + window + tcpip)],
                                   *channel[1:]],
        "nsca-packets": [[_nsca_packet((3, 1_700_000_000, 0, b"site-a", b"disk", b"OK",
                                        legacy, []))] for legacy in (False, True)],
        "netconf-preamble": [[b"MSG-ID:DEVICE-CONN-INFO\r\nMSG-VER:V1\r\n"
                              b"DEVICE-ID:site-a\r\n", b"HOST-KEY:AAAA\r\nHMAC:00\r\n",
                              b"SSH-2.0-x\r\n"], [b"SSH-2.0-OpenSSH_9.6\r\n"]],
        "login-names": [[b"alice", b"site-*", b"site-a"], [b"alice:site-a:2", b"*", b"x"]],
        "chooser": [[b"+site-a\n-site-b\n+x", b"1\r"], [b"+a", b"\x1b[A", b"\x7f", b"q\n"]],
    }
    if name == "ssh-server-framing":
        return [b"", pack_frames([b"\x00" * 4])[:8] + bytes(12), os.urandom(64)]
    if name == "ssh-connection-layer":
        return [flag + pack_frames(m) for m in channel
                for flag in (b"\x00", b"\x01")] + [b"\x01" + pack_frames([SESSION_OPEN])]
    if name == "nsca-any-method":
        return [b"\x00" + pack_frames([b"pw", bytes(128), b"x" * 720]),
                b"\x01" + pack_frames([b"", os.urandom(128), os.urandom(720)])]
    return [pack_frames(p) for p in parts[name]]


@attrs.frozen
class Run:
    """What libFuzzer reported for one target."""

    target: str
    executions: int
    features: int
    edges: int
    crashes: int
    returncode: int
    output: str


def write_corpus(name: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for n, seed in enumerate(seeds(name)):
        (into / f"seed-{n}").write_bytes(seed)
    return into


def run_target(name: str, seconds: float, workdir: Path, runs: int = -1,
               timeout: float | None = None) -> Run:
    """Fuzz `name` in a subprocess for `seconds` (or `runs` inputs, first reached),
    from its seed corpus; crashes are written to `workdir` as crash-* files."""
    corpus = write_corpus(name, workdir / f"corpus-{name}")
    argv = [sys.executable, str(Path(__file__)), name, f"-max_total_time={max(1, int(seconds))}",
            f"-runs={runs}", "-print_final_stats=1", "-max_len=2048", "-timeout=20",
            f"-artifact_prefix={workdir}/crash-{name}-", str(corpus)]
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          timeout=timeout or seconds + 60, cwd=workdir)
    output = done.stdout + done.stderr
    return Run(name, _stat(output, "number_of_executed_units"), _last(output, "ft"),
               _last(output, "cov"), len(list(workdir.glob(f"crash-{name}-*"))),
               done.returncode, output)


def _stat(output: str, name: str) -> int:
    found = re.findall(rf"stat::{name}:\s*(\d+)", output)
    return int(found[-1]) if found else 0


def _last(output: str, name: str) -> int:
    found = re.findall(rf"\b{name}: (\d+)", output)
    return int(found[-1]) if found else 0


def instrument(prefixes: list[str]) -> int:
    """Add atheris's coverage counters to the functions of the modules named by
    `prefixes`, imported already. (`atheris.instrument_imports` would recompile
    every module imported under it, instrumented or not: seconds of start-up.)"""
    import gc
    import types

    import atheris

    def wanted(module: object) -> bool:
        return isinstance(module, str) and any(
            module == p or module.startswith(p + ".") for p in prefixes)

    functions = [f for f in gc.get_objects()
                 if isinstance(f, types.FunctionType) and wanted(f.__module__)]
    for function in functions:
        atheris.instrument_func(function)
    return len(functions)


def main(argv: list[str]) -> None:
    import atheris

    sys.path.insert(0, str(HERE))
    target = build(argv[1])
    count = instrument(INSTRUMENTED[argv[1]])
    print(f"INFO: instrumented {count} functions for {argv[1]}", file=sys.stderr)

    def one_input(data: bytes) -> None:
        target(data)

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
