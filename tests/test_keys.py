from __future__ import annotations

import stat
from pathlib import Path

import pytest
from helpers import make_key

from hub.errors import BadKey
from hub.ssh.keys import HOST_KEY_FILES, MGMT_KEY_FILE, load_hub_keys, parse_public_key


def test_keys_created_once_with_mode_0600(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    first = load_hub_keys(str(keys_dir))
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for name in [*HOST_KEY_FILES, MGMT_KEY_FILE]:
        assert stat.S_IMODE((keys_dir / name).stat().st_mode) == 0o600
        assert (keys_dir / f"{name}.pub").exists()
    assert set(first.host_private) == {b"ssh-ed25519", b"ssh-rsa", b"ecdsa-sha2-nistp256"}
    assert first.host_private[b"ssh-rsa"].size() == 3072
    again = load_hub_keys(str(keys_dir))
    assert again.mgmt == first.mgmt and again.host_public == first.host_public
    assert first.mgmt_public_line.startswith("ssh-ed25519 ")
    assert not list(keys_dir.glob("*.tmp*"))


def test_loose_permissions_are_tightened(tmp_path: Path) -> None:
    load_hub_keys(str(tmp_path))
    (tmp_path / MGMT_KEY_FILE).chmod(0o644)
    load_hub_keys(str(tmp_path))
    assert stat.S_IMODE((tmp_path / MGMT_KEY_FILE).stat().st_mode) == 0o600


def test_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    load_hub_keys(str(tmp_path))
    (tmp_path / MGMT_KEY_FILE).write_text("garbage")
    with pytest.raises(BadKey, match=MGMT_KEY_FILE):
        load_hub_keys(str(tmp_path))


def test_parse_public_key_accepts_openssh_lines(tmp_path: Path) -> None:
    for kind in ("ed25519", "ecdsa", "rsa"):
        path = make_key(tmp_path / kind, f"root@{kind}-box", kind)
        line = parse_public_key(Path(f"{path}.pub").read_bytes())
        assert line.comment == f"root@{kind}-box"
        assert line.fingerprint.startswith("SHA256:") and "=" not in line.fingerprint


@pytest.mark.parametrize(("text", "message"), [
    (b"", "no public key"),
    (b"ssh-ed25519 AAAA", "not an OpenSSH public key"),
    (b"hello world\n", "not an OpenSSH public key"),
    (b"this is not a key", "not an OpenSSH public key: expected one line 'TYPE BASE64"),
    (b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "private key"),
])
def test_parse_public_key_refuses_bad_input(text: bytes, message: str) -> None:
    with pytest.raises(BadKey, match=message) as refused:
        parse_public_key(text)
    assert "b'" not in str(refused.value)


def test_two_keys_are_refused(tmp_path: Path) -> None:
    a = Path(f"{make_key(tmp_path / 'a')}.pub").read_bytes()
    b = Path(f"{make_key(tmp_path / 'b')}.pub").read_bytes()
    with pytest.raises(BadKey, match="exactly one"):
        parse_public_key(a + b)


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    import subprocess
    path = make_key(tmp_path / "k")
    expected = subprocess.run(["ssh-keygen", "-l", "-f", f"{path}.pub"], capture_output=True,
                              check=True, text=True).stdout.split()[1]
    assert parse_public_key(Path(f"{path}.pub").read_bytes()).fingerprint == expected
