"""The transport policy with the real OpenSSH client: legacy algorithms refused by default,
accepted with `[transport] legacy_algorithms = true`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SSH, HubProcess, SSHClient

pytestmark = pytest.mark.e2e

# One forced choice each: the key exchange, the host key, the MAC (with a non-AEAD cipher).
FORCED = {
    "ecdh-sha2-nistp256": (["-o", "KexAlgorithms=ecdh-sha2-nistp256"],
                           b"no matching key exchange method found"),
    "ecdsa host key": (["-o", "HostKeyAlgorithms=ecdsa-sha2-nistp256"],
                       b"no matching host key type found"),
    "hmac-sha2-256": (["-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha2-256"],
                      b"no matching MAC found"),
    "hmac-sha2-512": (["-o", "Ciphers=aes256-ctr", "-o", "MACs=hmac-sha2-512"],
                      b"no matching MAC found"),
}
# Negotiation errors are logged at INFO; each run sees the host key it gets afresh.
QUIET = ["-o", "LogLevel=INFO", "-o", "UserKnownHostsFile=/dev/null"]


def start(tmp_path: Path, config: str) -> Iterator[SSHClient]:
    if SSH is None:
        pytest.skip("the OpenSSH client is not installed")
    hub = HubProcess(tmp_path / "hub")
    hub.data.mkdir(parents=True)
    (hub.data / "callhomehub.toml").write_text(config)
    hub.start()
    try:
        yield SSHClient(tmp_path / "client", hub.port)
    finally:
        hub.stop()


@pytest.fixture
def default_hub(tmp_path: Path) -> Iterator[SSHClient]:
    yield from start(tmp_path, "")


@pytest.fixture
def legacy_hub(tmp_path: Path) -> Iterator[SSHClient]:
    yield from start(tmp_path, "[transport]\nlegacy_algorithms = true\n")


@pytest.mark.parametrize("name", sorted(FORCED))
def test_legacy_algorithms_are_refused_by_default(default_hub: SSHClient, name: str) -> None:
    options, refusal = FORCED[name]
    result = default_hub.run("cms@127.0.0.1", "true", options=[*QUIET, *options])
    assert result.returncode == 255 and refusal in result.stderr, result.stderr


def test_legacy_algorithms_are_accepted_when_enabled(legacy_hub: SSHClient) -> None:
    for name in sorted(FORCED):
        options, refusal = FORCED[name]
        # Key exchange done: the login is what fails (no credentials), not the negotiation.
        result = legacy_hub.run("cms@127.0.0.1", "true", options=[*QUIET, *options])
        assert result.returncode == 255 and refusal not in result.stderr, (name, result.stderr)
        assert b"Permission denied" in result.stderr, (name, result.stderr)


def test_a_default_client_negotiates_the_best_it_shares(default_hub: SSHClient) -> None:
    result = default_hub.run("cms@127.0.0.1", "true", options=["-v"])
    # mlkem768x25519-sha256 with OpenSSH 9.9 and later; curve25519 before.
    assert (b"kex: algorithm: mlkem768x25519-sha256" in result.stderr
            or b"kex: algorithm: curve25519-sha256" in result.stderr), result.stderr[-2000:]
    assert b"kex: host key algorithm: ssh-ed25519" in result.stderr
