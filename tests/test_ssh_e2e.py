"""
ModernTransportMixin against the real OpenSSH: the OpenSSH client against a
small Conch server, and a Conch client against a real sshd, on loopback and
the real reactor (pytest-twisted).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.conch.ssh import keys
from twisted.internet import defer, endpoints, protocol, task, utils
from twisted.logger import LogEvent, globalLogPublisher

from hub.ssh.modern import AES128_GCM, AES256_GCM, CHACHA20_POLY1305, MACS
from hub.ssh.testing import ClientPeer, CommandChannel, makeServerFactory, newEd25519Key, newRSAKey

SSH = shutil.which("ssh")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(SSH is None, reason="the OpenSSH client is not installed"),
]

AEAD = [CHACHA20_POLY1305, AES128_GCM, AES256_GCM]
NON_AEAD = [(b"aes128-ctr", m) for m in MACS] + [(b"aes192-ctr", MACS[0]), (b"aes256-ctr", MACS[0])]
# Encrypt-then-MAC: every CTR cipher with every EtM MAC the hub offers.
ETM = [(c, m) for c in (b"aes128-ctr", b"aes192-ctr", b"aes256-ctr") for m in MACS
       if m.endswith(b"-etm@openssh.com")]


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def waitFor(condition: Callable[[], object], timeout: float = 20.0,
                  what: str = "condition") -> None:
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    observer = seen.append
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def _writeKey(path: Path, key: keys.Key) -> str:
    path.write_bytes(key.toString("openssh"))
    path.chmod(0o600)
    return str(path)


async def _startHub(tmp_path: Path, userKey: keys.Key, **attributes: Any) -> tuple[Any, Any]:
    reactor = _reactor()
    factory = makeServerFactory(newEd25519Key(), b"alice", userKey, reactor)
    for name, value in attributes.items():
        setattr(factory.protocol, name, value)
    endpoint = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    port = await endpoint.listen(factory)
    return port, factory


def _sshCommand(tmp_path: Path, port: int, identity: str, cipher: bytes,
                mac: bytes, command: str) -> list[str]:
    assert SSH is not None
    return [
        SSH, "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=no",
        "-o", f"Ciphers={cipher.decode()}", "-o", f"MACs={mac.decode()}",
        "-i", identity, "-p", str(port), "-vvv", "alice@127.0.0.1", command,
    ]


async def _runSsh(args: list[str], stdin: Path | None = None) -> tuple[bytes, str, int]:
    if stdin is None:
        out, err, code = await utils.getProcessOutputAndValue(
            args[0], args[1:], env=dict(os.environ)
        )
    else:
        shell = " ".join(f"'{a}'" for a in args) + f" < '{stdin}'"
        out, err, code = await utils.getProcessOutputAndValue(
            "/bin/sh", ["-c", shell], env=dict(os.environ)
        )
    return out, err.decode("utf-8", "replace"), code


@pytest.mark.parametrize(
    "cipher,mac", [(c, MACS[0]) for c in AEAD] + NON_AEAD, ids=lambda v: v.decode()
)
@pytest_twisted.ensureDeferred
async def test_openssh_client_negotiates(tmp_path: Path, cipher: bytes, mac: bytes) -> None:
    user = newEd25519Key()
    identity = _writeKey(tmp_path / "id_ed25519", user)
    port, _ = await _startHub(tmp_path, user)
    try:
        _, err, code = await _runSsh(
            _sshCommand(tmp_path, port.getHost().port, identity, cipher, mac, "true")
        )
    finally:
        await port.stopListening()
    assert code == 0, err[-2000:]
    shown = "<implicit>" if cipher in AEAD else mac.decode()
    for direction in ("server->client", "client->server"):
        assert f"kex: {direction} cipher: {cipher.decode()} MAC: {shown} compression: none" in err
    assert "will use strict KEX ordering" in err


@pytest.mark.parametrize("cipher,mac", ETM, ids=lambda v: v.decode())
@pytest_twisted.ensureDeferred
async def test_openssh_client_bulk_etm(tmp_path: Path, cipher: bytes, mac: bytes) -> None:
    """
    2 MB each way through `cat` with the real OpenSSH client: the hub's
    CTR packets, sealed piece by piece into its buffers at full channel
    packet size, and the client's, opened in place, stay byte-exact.
    """
    user = newEd25519Key()
    identity = _writeKey(tmp_path / "id_ed25519", user)
    data = os.urandom(2_000_000)
    (tmp_path / "data").write_bytes(data)
    port, _ = await _startHub(tmp_path, user)
    try:
        out, err, code = await _runSsh(
            _sshCommand(tmp_path, port.getHost().port, identity, cipher, mac, "cat"),
            stdin=tmp_path / "data",
        )
    finally:
        await port.stopListening()
    assert code == 0, err[-2000:]
    assert f"kex: server->client cipher: {cipher.decode()} MAC: {mac.decode()}" in err
    assert out == data


@pytest.mark.parametrize("cipher", [CHACHA20_POLY1305, AES256_GCM, b"aes128-ctr"],
                         ids=lambda v: v.decode())
@pytest_twisted.ensureDeferred
async def test_openssh_client_across_hub_rekeys(
    tmp_path: Path, events: list[LogEvent], cipher: bytes
) -> None:
    user = newEd25519Key()
    identity = _writeKey(tmp_path / "id_ed25519", user)
    data = os.urandom(600_000)
    (tmp_path / "data").write_bytes(data)
    port, _ = await _startHub(tmp_path, user, rekeyDataLimit=64 * 1024)
    try:
        out, err, code = await _runSsh(
            _sshCommand(tmp_path, port.getHost().port, identity, cipher, MACS[0], "cat"),
            stdin=tmp_path / "data",
        )
    finally:
        await port.stopListening()
    assert code == 0, err[-2000:]
    assert out == data
    hub_rekeys = [e for e in events if e.get("why") == "data limit"]
    assert len(hub_rekeys) >= 3
    assert err.count("SSH2_MSG_KEXINIT received") >= 4


@pytest_twisted.ensureDeferred
async def test_openssh_client_rsa_user_key(tmp_path: Path) -> None:
    # Only an ed25519 host key, yet OpenSSH offers its RSA key with SHA-2
    # because server-sig-algs lists rsa-sha2-*.
    user = newRSAKey()
    identity = _writeKey(tmp_path / "id_rsa", user)
    port, _ = await _startHub(tmp_path, user)
    try:
        _, err, code = await _runSsh(
            _sshCommand(tmp_path, port.getHost().port, identity, CHACHA20_POLY1305,
                        MACS[0], "true")
        )
    finally:
        await port.stopListening()
    assert code == 0, err[-2000:]
    assert "signing using rsa-sha2-512" in err and "Authenticated to 127.0.0.1" in err


class _Sshd(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.err = b""
        # The listener's exit, not its pipes' end: a session process it forked holds
        # its stderr until that session's client goes away.
        self.ended: defer.Deferred[None] = defer.Deferred()

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processExited(self, reason: Any) -> None:
        self.ended.callback(None)


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sshdDir(tmp_path: Path) -> Path:
    if not os.path.exists(SSHD):
        pytest.skip("sshd is not installed")
    if os.geteuid() != 0:
        pytest.skip("a throwaway sshd needs root here")
    # sshd insists on its privilege separation directory.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    directory = tmp_path / "sshd"
    directory.mkdir()
    return directory


async def _startSshd(directory: Path, userKey: keys.Key) -> tuple[Any, _Sshd, int, keys.Key]:
    host_key = newEd25519Key()
    host_path = _writeKey(directory / "host_ed25519", host_key)
    (directory / "authorized_keys").write_bytes(userKey.public().toString("openssh") + b"\n")
    port = _freePort()
    (directory / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nHostKey {host_path}\nSetEnv HOME={directory}\n"
        f"PidFile {directory / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPermitRootLogin prohibit-password\nLogLevel DEBUG1\n"
    )
    proto = _Sshd()
    process = _reactor().spawnProcess(
        proto, SSHD, [SSHD, "-f", str(directory / "sshd_config"), "-D", "-e", "-p", str(port)],
        env={},
    )
    await waitFor(lambda: b"Server listening" in proto.err or proto.ended.called,
                  what="sshd to listen")
    assert not proto.ended.called, proto.err.decode()
    return process, proto, port, host_key


async def _runClient(port: int, peer: ClientPeer, **attributes: Any) -> tuple[Any, CommandChannel]:
    reactor = _reactor()
    transport = peer.buildProtocol(reactor)
    for name, value in attributes.items():
        setattr(transport, name, value)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoints.connectProtocol(endpoint, transport)
    try:
        await waitFor(lambda: peer.channel is not None, what="a session channel")
        assert peer.channel is not None
        channel = await peer.channel.done.addTimeout(30, reactor)
    finally:
        # Also on a timeout: sshd's session process lives as long as this connection.
        transport.loseConnection()
    return transport, channel


async def _stopSshd(process: Any, proto: _Sshd) -> None:
    if not proto.ended.called:
        process.signalProcess("TERM")
    await proto.ended.addTimeout(30, _reactor())


@pytest.mark.parametrize("cipher,mac", [(c, MACS[0]) for c in AEAD] + NON_AEAD,
                         ids=lambda v: v.decode())
@pytest_twisted.ensureDeferred
async def test_conch_client_against_sshd(sshdDir: Path, cipher: bytes, mac: bytes) -> None:
    user = newEd25519Key()
    process, proto, port, host_key = await _startSshd(sshdDir, user)
    try:
        peer = ClientPeer(b"root", user, host_key, command=b"echo hello from sshd")
        transport, channel = await _runClient(
            port, peer, supportedCiphers=[cipher], supportedMACs=[mac]
        )
    finally:
        await _stopSshd(process, proto)
    assert (channel.status, channel.output) == (0, b"hello from sshd\n")
    assert transport.currentEncryptions.outCipType == cipher
    assert transport._strict


@pytest_twisted.ensureDeferred
async def test_conch_client_rsa_sha2_against_sshd(sshdDir: Path) -> None:
    user = newRSAKey()
    process, proto, port, host_key = await _startSshd(sshdDir, user)
    try:
        peer = ClientPeer(b"root", user, host_key, command=b"true")
        _, channel = await _runClient(port, peer)
    finally:
        await _stopSshd(process, proto)
    assert channel.status == 0
    assert b"pkalg rsa-sha2-512" in proto.err


@pytest_twisted.ensureDeferred
async def test_conch_client_rekeys_with_sshd(sshdDir: Path, events: list[LogEvent]) -> None:
    user = newEd25519Key()
    process, proto, port, host_key = await _startSshd(sshdDir, user)
    try:
        peer = ClientPeer(b"root", user, host_key, command=b"head -c 500000 /dev/zero")
        transport, channel = await _runClient(port, peer, rekeyDataLimit=64 * 1024)
    finally:
        await _stopSshd(process, proto)
    assert channel.status == 0 and channel.output == bytes(500_000)
    assert sum(1 for e in events if e.get("log_source") is transport
               and e.get("why") == "data limit") >= 3
