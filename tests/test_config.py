from __future__ import annotations

from pathlib import Path

import pytest

from hub.app.config import build_config, parse_port_range
from hub.errors import ConfigError


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    config = build_config({"data": str(tmp_path)})
    assert (config.ssh, config.port_low, config.port_high) == ("tcp:22", 49152, 65535)
    assert (config.keepalive, config.keepalive_count, config.registrar_user) == (15, 3, "cms")
    assert config.limits.login_timeout == 120
    assert (config.limits.max_forwards_pending, config.limits.max_forwards) == (3, 16)
    assert config.limits.pending_lease_expiry == 86400
    assert config.db_path == str(tmp_path / "hub.sqlite3")


def test_config_file_in_data_dir_is_read(tmp_path: Path) -> None:
    (tmp_path / "callhomehub.toml").write_text(
        '[registrar]\nuser = "callhome"\n[nsca]\npassword = "x"\nencryption = 14\n'
        '[limits]\nlogin_timeout = 30\n[netconf.secrets]\nrouter1 = "s3cret"\n')
    config = build_config({"data": str(tmp_path)})
    assert config.registrar_user == "callhome"
    assert (config.nsca.password, config.nsca.encryption) == ("x", 14)
    assert config.limits.login_timeout == 30
    assert config.netconf_secrets == {"router1": "s3cret"}


@pytest.mark.parametrize(("text", "message"), [
    ('[nsca]\npasword = "x"\n', "unknown key 'pasword' in [nsca]"),
    ('[nsac]\n', "unknown section [nsac]"),
    ('[nsca]\nencryption = "one"\n', "[nsca] encryption has the wrong type"),
    ('[nsca]\nmax_age = true\n', "[nsca] max_age must be a number"),
    ('[registrar]\nuser = "no spaces"\n', "[registrar] user"),
    ('[nsca\n', "not valid TOML"),
    ('[limits]\nmax_auth_tries = 0\n', "[limits]"),
    ('[limits]\nmax_forwards = 0\n', "[limits] max_forwards must be >= 1"),
    ('[limits]\nmax_forwards_pending = -1\n', "[limits] max_forwards_pending must be >= 0"),
    ('[limits]\npending_lease_expiry = 5\n', "[limits] pending_lease_expiry must be >= 60"),
    ('[limits]\nmax_forwards = 2.5\n', "[limits] max_forwards has the wrong type"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        build_config({"data": str(tmp_path), "config": str(path)})
    assert message in str(e.value)
    assert str(path) in str(e.value) or "[" in message


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        build_config({"data": str(tmp_path), "config": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(("text", "expected"), [("49152-65535", (49152, 65535)),
                                                ("2000 - 2010", (2000, 2010))])
def test_port_range(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "5000", "10-5", "0-10", "1-70000", "a-b"])
def test_bad_port_range(text: str) -> None:
    with pytest.raises(ConfigError, match="--port-range"):
        parse_port_range(text)


@pytest.mark.parametrize(("key", "value"), [("keepalive", "-1"), ("keepalive", "soon"),
                                            ("keepalive-count", "0")])
def test_bad_keepalive(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"--{key}"):
        build_config({"data": str(tmp_path), key: value})
