"""What the hub's SSH server offers: the legacy algorithms only when the config asks."""

from __future__ import annotations

from pathlib import Path

import pytest
from memory_hub import make_hub, start_factory
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from hub.access.device_client import DeviceClientTransport
from hub.access.server import HubServerTransport
from hub.app.config import build_config
from hub.errors import ConfigError
from hub.ssh.algorithms import (
    CIPHERS,
    CLIENT_CIPHERS,
    HOST_KEY_ALGORITHMS,
    KEX_ALGORITHMS,
    LEGACY_HOST_KEY_ALGORITHMS,
    LEGACY_KEX_ALGORITHMS,
    LEGACY_MACS,
    MACS,
    TransportPolicy,
    aes_instructions,
    client_ciphers,
)
from hub.ssh.ciphers import AES128_GCM, AES256_GCM

LEGACY = {*LEGACY_KEX_ALGORITHMS, *LEGACY_HOST_KEY_ALGORITHMS, *LEGACY_MACS}


def offered(tmp_path: Path, config: str | None) -> tuple[list[bytes], list[bytes], list[bytes]]:
    if config is not None:
        (tmp_path / "callhomehub.toml").write_text(config)
    hub = make_hub(tmp_path, MemoryReactorClock())
    transport = start_factory(hub).buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    # The transport keeps, at connectionMade, the host key algorithms of its
    # preference list that the factory allowed, in that order.
    host_keys = [n for n in transport.hostKeyAlgorithms if n in transport.supportedPublicKeys]
    return transport.supportedKeyExchanges, host_keys, transport.supportedMACs


def test_the_hub_offers_no_legacy_algorithm_by_default(tmp_path: Path) -> None:
    kex, host_keys, macs = offered(tmp_path, None)
    assert kex[0] == b"mlkem768x25519-sha256"
    assert kex == [b"mlkem768x25519-sha256", b"curve25519-sha256",
                   b"curve25519-sha256@libssh.org"]
    assert host_keys == [b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256"]
    assert macs == [b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-512-etm@openssh.com"]
    assert not LEGACY & {*kex, *host_keys, *macs}


def test_legacy_algorithms_are_offered_after_the_modern_ones_when_enabled(
        tmp_path: Path) -> None:
    kex, host_keys, macs = offered(tmp_path, "[transport]\nlegacy_algorithms = true\n")
    assert kex == [b"mlkem768x25519-sha256", b"curve25519-sha256",
                   b"curve25519-sha256@libssh.org", *LEGACY_KEX_ALGORITHMS]
    assert host_keys == [b"ssh-ed25519", b"ecdsa-sha2-nistp256", b"rsa-sha2-512",
                         b"rsa-sha2-256"]
    assert macs == list(MACS)

def test_the_ecdsa_host_key_is_still_made(tmp_path: Path) -> None:
    offered(tmp_path, None)
    assert (tmp_path / "keys" / "ssh_host_ecdsa_key").exists()


def test_the_ssh_layer_lists_keep_the_legacy_names_for_clients() -> None:
    # The hub as a client (to devices, NETCONF call home) still speaks to old peers.
    assert set(LEGACY_KEX_ALGORITHMS) <= set(KEX_ALGORITHMS)
    assert set(LEGACY_HOST_KEY_ALGORITHMS) <= set(HOST_KEY_ALGORITHMS)
    assert set(LEGACY_MACS) <= set(MACS)
    assert TransportPolicy().macs(MACS) == [m for m in MACS if m not in LEGACY_MACS]


def test_config_key_and_its_type(tmp_path: Path) -> None:
    assert build_config({"data": str(tmp_path)}).transport == TransportPolicy(False)
    (tmp_path / "callhomehub.toml").write_text('[transport]\nlegacy_algorithms = "yes"\n')
    with pytest.raises(ConfigError, match=r"\[transport\] legacy_algorithms has the wrong type"):
        build_config({"data": str(tmp_path)})
    (tmp_path / "callhomehub.toml").write_text("[transport]\nlegacy = true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'legacy' in \[transport\]"):
        build_config({"data": str(tmp_path)})


X86 = "processor\t: 0\nflags\t\t: fpu sse2 aes avx2 sha_ni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2\n"
NO_AES = "processor\t: 0\nflags\t\t: fpu sse2 avx2\n"


def test_the_hub_as_a_client_prefers_aes_gcm_where_the_cpu_has_aes() -> None:
    assert aes_instructions(X86) and aes_instructions(ARM)
    assert not aes_instructions(NO_AES) and not aes_instructions("")
    with_aes = client_ciphers(True)
    assert with_aes[:2] == (AES128_GCM, AES256_GCM)
    assert sorted(with_aes) == sorted(CIPHERS)  # the same set, only the order differs
    assert client_ciphers(False) == CIPHERS
    # Its sessions to devices, NETCONF devices and peer hubs use that order; the
    # server keeps OpenSSH's (a client's order decides: devices keep theirs).
    assert DeviceClientTransport.supportedCiphers == list(CLIENT_CIPHERS)
    assert HubServerTransport.supportedCiphers == list(CIPHERS)
