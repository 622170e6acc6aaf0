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
    ('[nsca]\nmax_connections = 0\n', "[nsca] 'max_connections' must be >= 1"),
    ('[nsca]\nmax_connections_per_source = 0\n', "[nsca] 'max_connections_per_source' must"),
    ('[registrar]\nuser = "no spaces"\n', "[registrar] user"),
    ('[nsca\n', "not valid TOML"),
    ('[netconf]\nallow = ["router*", ""]\n', "[netconf] allow: expected a list"),
    ('[netconf]\nallow = "router*"\n', "[netconf] allow has the wrong type"),
    ('[netconf]\nunknown_per_minute = 0\n', "[netconf] unknown_per_minute must be >= 1"),
    ('[netconf]\nunknown_per_minute_total = 0\n', "[netconf] unknown_per_minute_total must"),
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


@pytest.mark.parametrize(("option", "value"), [
    ("ssh", "2222"), ("nsca", "tcp:x"), ("netconf", "tcpp:4334"), ("ssh", "tcp:22:bogus=1")])
def test_a_bad_endpoint_is_one_line_naming_the_option(tmp_path: Path, option: str,
                                                      value: str) -> None:
    with pytest.raises(ConfigError, match=f"^--{option}: '{value}' is not a listening endpoint"):
        build_config({"data": str(tmp_path), option: value})
    assert build_config({"data": str(tmp_path), option: "tcp:0:interface=127.0.0.1"})


@pytest.mark.parametrize(("text", "message"), [
    ('[limits]\nmax_startups = "10:30"\n', "[limits] max_startups: expected START:RATE:FULL"),
    ('[limits]\nmax_startups = "50:30:10"\n', "[limits] max_startups: need 1 <= START"),
    ('[limits]\nper_source_unauthenticated = 0\n', "[limits] per_source_unauthenticated must"),
    ('[limits]\nkex_grace = 200\n', "[limits] kex_grace (200) must not exceed"),
    ('[limits]\npenalty_exempt = ["10.0.0.0/8", "x"]\n', "[limits] penalty_exempt: 'x'"),
    ('[limits]\npenalty_exempt = [1]\n', "[limits] penalty_exempt must be a list"),
    ('[limits]\npassword_checks_per_minute = 0\n', "[limits] password_checks_per_minute"),
])
def test_bad_admission_limits_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "callhomehub.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        build_config({"data": str(tmp_path)})
    assert message in str(e.value)


def test_admission_limits_are_read(tmp_path: Path) -> None:
    (tmp_path / "callhomehub.toml").write_text(
        '[limits]\nmax_startups = "20:50:200"\npenalty_exempt = ["192.0.2.0/24"]\n'
        'kex_grace = 5\npassword_checks_global_per_minute = 60\n')
    limits = build_config({"data": str(tmp_path)}).limits
    assert limits.max_startups == "20:50:200" and limits.kex_grace == 5
    assert limits.penalty_exempt == ("192.0.2.0/24",)
    assert limits.password_checks_global_per_minute == 60


def test_web_proxy_settings_are_read(tmp_path: Path) -> None:
    assert build_config({"data": str(tmp_path)}).web_proxy.max_body == 16 * 1024 * 1024
    (tmp_path / "callhomehub.toml").write_text(
        "[web_proxy]\nmax_body = 1024\ntimeout = 5\nsandbox = false\naudit_interval = 60\n")
    settings = build_config({"data": str(tmp_path)}).web_proxy
    assert (settings.max_body, settings.timeout, settings.sandbox,
            settings.audit_interval) == (1024, 5, False, 60)


@pytest.mark.parametrize(("text", "message"), [
    ("[web_proxy]\nmax_body = -1\n", "[web_proxy] max_body must be >= 0"),
    ("[web_proxy]\ntimeout = 0\n", "[web_proxy] timeout must be > 0"),
    ("[web_proxy]\nmax_bdy = 1\n", "unknown key 'max_bdy' in [web_proxy]"),
    ('[web_proxy]\nsandbox = "no"\n', "[web_proxy] sandbox has the wrong type"),
])
def test_bad_web_proxy_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "callhomehub.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        build_config({"data": str(tmp_path)})
    assert message in str(e.value)
