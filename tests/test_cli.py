"""The admin CLI in-process: one clear line and exit status 1 for what it refuses."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hub import __version__
from hub.app.cli import main
from hub.store.registry import Registry


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["--data", str(tmp_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_password_longer_than_bcrypt_takes_is_one_line_and_status_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(tmp_path, monkeypatch, capsys, "callhome-password", stdin=b"x" * 73)
    assert (code, out) == (1, "")
    assert err == ("callhomehub: the password is 73 bytes long; at most 72 bytes can be "
                   "stored (bcrypt's limit)\n")
    code, _, err = run(tmp_path, monkeypatch, capsys, "user", "add", "alice",
                       "--password-stdin", stdin=b"y" * 100)
    assert code == 1 and err.count("\n") == 1 and "100 bytes" in err
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    assert registry.setting("callhome_password") is None and registry.users() == []
    code, out, _ = run(tmp_path, monkeypatch, capsys, "callhome-password", stdin=b"x" * 72)
    assert (code, out) == (0, "Call Home Password set\n")


@pytest.mark.parametrize("name", ["cms", "CMS", "Cms", "alice\n", "alice\nbob", ".x"])
def test_user_add_refuses_the_registrar_name_in_any_case_and_bad_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        name: str) -> None:
    code, _, err = run(tmp_path, monkeypatch, capsys, "user", "add", name, "--password-stdin",
                       stdin=b"secret")
    assert code == 1 and err == f"callhomehub: user add: invalid user name {name!r}\n"


def test_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"callhomehub {__version__}\n"


def test_status_of_an_unknown_node_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, monkeypatch, capsys, "callhome-password", stdin=b"pw")[0] == 0
    assert run(tmp_path, monkeypatch, capsys, "status")[0] == 0
    code, out, err = run(tmp_path, monkeypatch, capsys, "status", "NOSUCH")
    assert (code, out, err) == (1, "", "callhomehub: no node named 'NOSUCH'\n")


@pytest.mark.parametrize("command", [["nodes"], ["users"], ["approve", "x"], ["mgmt-key"]])
def test_a_directory_without_a_registry_is_refused_not_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str]) -> None:
    elsewhere = tmp_path / "nosuch" / "dir"
    code, out, err = run(elsewhere, monkeypatch, capsys, *command)
    assert (code, out) == (1, "")
    assert err == (f"callhomehub: no hub registry in {elsewhere}: start the hub there first, "
                   "or pass --data (or set CALLHOMEHUB_DATA)\n")
    assert not (tmp_path / "nosuch").exists()


def test_callhomehub_data_stands_in_for_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CALLHOMEHUB_DATA", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"pw")))
    assert main(["callhome-password"]) == 0
    assert (tmp_path / "hub" / "hub.sqlite3").exists()
    assert main(["users"]) == 0
    assert not (tmp_path / "hub.sqlite3").exists()
