"""The `[nsca]` section becomes the intake's one settings value, or a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hub.app.config import build_config
from hub.errors import ConfigError
from hub.intake.nsca import supported_methods
from hub.intake.settings import NSCASettings


def config_with(tmp_path: Path, section: str) -> NSCASettings:
    (tmp_path / "callhomehub.toml").write_text(f"[nsca]\n{section}")
    return build_config({"data": str(tmp_path)}).nsca


def test_the_section_is_the_intake_settings(tmp_path: Path) -> None:
    settings = config_with(tmp_path, 'password = "pw"\nencryption = 0\nmax_age = 0\n'
                                     'strict_host = true\nhistory = 1\n')
    assert settings == NSCASettings(password="pw", encryption=0, max_age=0, strict_host=True,
                                    history=1)
    assert settings.read_timeout == 30.0
    assert "pw" not in repr(settings)


def test_defaults(tmp_path: Path) -> None:
    assert build_config({"data": str(tmp_path)}).nsca == NSCASettings(
        password="", encryption=1, max_age=30, strict_host=True, history=100, hosts={})


def test_host_mapping(tmp_path: Path) -> None:
    settings = config_with(tmp_path, '[nsca.hosts]\n"site-a" = ["prod-1", "DB-*"]\n')
    assert settings.hosts == {"site-a": ("prod-1", "db-*")}
    assert settings.may_report("Site-A", "db-2") and not settings.may_report("site-b", "db-2")
    with pytest.raises(ConfigError, match=r"^\[nsca\] hosts: site-a: expected a list"):
        config_with(tmp_path, '[nsca.hosts]\n"site-a" = "prod-1"\n')
    with pytest.raises(ConfigError, match=r"\[nsca\] hosts has the wrong type"):
        config_with(tmp_path, 'hosts = 3\n')


@pytest.mark.parametrize(("section", "message"), [
    ("encryption = 8\n",
     "[nsca] encryption: NSCA encryption method 8 (blowfish) is not supported; supported: "),
    ("encryption = 99\n", "[nsca] encryption: NSCA encryption method 99 is not supported"),
    ("max_age = -1\n", "[nsca] max_age must be >= 0 and history >= 1"),
    ("history = 0\n", "[nsca] max_age must be >= 0 and history >= 1"),
])
def test_bad_values_name_the_key(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        config_with(tmp_path, section)


def test_the_intake_refuses_what_the_config_refuses() -> None:
    with pytest.raises(ValueError, match=r"^encryption: NSCA encryption method 8 "):
        NSCASettings(encryption=8)
    with pytest.raises(ValueError, match=r"^max_age must be >= 0 and history >= 1$"):
        NSCASettings(history=0)
    with pytest.raises(ValueError):
        NSCASettings(read_timeout=0)
    assert all(NSCASettings(encryption=m).encryption == m for m in supported_methods())
