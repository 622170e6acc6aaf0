"""The admin CLI in-process: one clear line and exit status 1 for what it refuses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from memory_hub import new_key

from hub import __version__
from hub.app.cli import main
from hub.ssh.keys import fingerprint, parse_public_key
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
def test_user_set_replaces_what_is_given_and_keeps_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for name in ("k1", "k2"):
        path = tmp_path / f"{name}.pub"
        path.write_bytes(new_key().public().toString("openssh") + b" " + name.encode())
        paths.append(str(path))
    code, _, _ = run(tmp_path, monkeypatch, capsys, "user", "add", "alice", "--key", paths[0],
                     "--allow", "site-*", "lab")
    assert code == 0
    code, out, err = run(tmp_path, monkeypatch, capsys, "user", "set", "alice",
                         "--allow", "edge-*")
    assert (code, out, err) == (0, "user alice changed (1 key(s), password none, "
                                   "allow edge-*)\n", "")
    code, out, _ = run(tmp_path, monkeypatch, capsys, "user", "set", "ALICE", "--key", paths[1],
                       "--password-stdin", stdin=b"pw\n")
    assert (code, out) == (0, "user alice changed (1 key(s), password set, allow edge-*)\n")
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    alice = registry.user("alice")
    assert alice.keys == (parse_public_key(Path(paths[1]).read_bytes()).blob,)
    assert alice.password_hash is not None and alice.allow == ("edge-*",)
    code, out, _ = run(tmp_path, monkeypatch, capsys, "user", "set", "alice", "--no-allow")
    assert (code, out) == (0, "user alice changed (1 key(s), password set, allow -)\n")
    assert [e.action for e in registry.audit_log()][-3:] == ["user-set"] * 3
    registry.close()


@pytest.mark.parametrize(("args", "message"), [
    (("nobody", "--allow", "x"), "no user named 'nobody'"),
    (("alice",), "user set: nothing to change (--key, --allow, --no-allow, "
                 "--password-stdin, --no-password, --cert-only, --admin, --no-admin)"),
    (("alice", "--admin", "--no-admin"), "user set: give --admin or --no-admin, not both"),
    (("alice", "--password-stdin", "--no-password"),
     "user set: give --password-stdin or --no-password, not both"),
    (("alice", "--allow", "x", "--no-allow"), "user set: give --allow or --no-allow, not both"),
    (("alice", "--no-password"), "user alice: would have neither a key nor a password"),
    (("alice", "--key", "/nonexistent.pub"),
     "user set: --key /nonexistent.pub: No such file or directory"),
])
def test_user_set_refusals_are_one_line_and_change_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        args: tuple[str, ...], message: str) -> None:
    code, _, _ = run(tmp_path, monkeypatch, capsys, "user", "add", "alice",
                     "--password-stdin", "--allow", "site-*", stdin=b"pw")
    assert code == 0
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    before = registry.user("alice")
    code, out, err = run(tmp_path, monkeypatch, capsys, "user", "set", *args)
    assert (code, out, err) == (1, "", f"callhomehub: {message}\n")
    assert registry.user("alice") == before
    registry.close()


T0 = 1796180645.0  # 2026-12-02T03:04:05Z


def test_nodes_show_live_forwards_leases_iso_times_and_the_pinned_host_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    now = [T0]
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: now[0])
    host_key = new_key().public().blob()
    for name in ("site-a", "site-b"):
        registry.register(name, new_key().public().blob(), f"SHA256:{name}", "test")
        registry.lease(name, "ssh", 49152, 49200)
    registry.lease("site-a", "http", 49152, 49200)
    registry.set_device_access("site-a", "test", host_key=host_key)
    registry.mark_online("site-a", "192.0.2.7")
    registry.set_lease_active("site-a", "ssh", True)  # http: leased, not listening now
    now[0] = T0 + 3600
    registry.mark_online("site-b", "192.0.2.8")
    registry.mark_offline("site-b")
    registry.close()
    code, out, _ = run(tmp_path, monkeypatch, capsys, "nodes", "--json")
    a, b = json.loads(out)
    assert code == 0
    assert (a["forwards"], a["leases"]) == ({"ssh": 49152}, {"ssh": 49152, "http": 49154})
    assert (b["forwards"], b["leases"]) == ({}, {"ssh": 49153})
    assert (a["last_seen"], a["online_since"]) == ("2026-12-02T03:04:05Z",) * 2
    assert (b["last_seen"], b["online_since"]) == ("2026-12-02T04:04:05Z", None)
    assert a["host_key"] == fingerprint(host_key) and b["host_key"] is None
    for field in ("name", "state", "online", "fingerprint", "forwards", "public",
                  "last_seen", "peer"):
        assert field in a
    code, out, _ = run(tmp_path, monkeypatch, capsys, "nodes")
    row_a, row_b = out.splitlines()[1:]
    assert "ssh=49152,http=49154 (lease)" in row_a and "2026-12-02T03:04:05Z" in row_a
    assert "ssh=49153 (lease)" in row_b and "2026-12-02T04:04:05Z" in row_b
    code, out, _ = run(tmp_path, monkeypatch, capsys, "audit", "--json")
    assert {e["time"] for e in json.loads(out)} == {"2026-12-02T03:04:05Z"}
    code, out, _ = run(tmp_path, monkeypatch, capsys, "audit")
    assert out.splitlines()[1].startswith("2026-12-02T03:04:05Z  ")


def test_admin_mark_on_user_add_and_set_shown_by_users(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, monkeypatch, capsys, "user", "add", "root", "--admin",
                       "--password-stdin", stdin=b"pw")
    assert code == 0 and out.endswith(", admin)\n")
    assert run(tmp_path, monkeypatch, capsys, "user", "add", "bob", "--password-stdin",
               stdin=b"pw")[0] == 0
    _, out, _ = run(tmp_path, monkeypatch, capsys, "users", "--json")
    assert [(u["name"], u["admin"]) for u in json.loads(out)] == [("root", True), ("bob", False)]
    assert run(tmp_path, monkeypatch, capsys, "user", "set", "bob", "--admin")[0] == 0
    assert run(tmp_path, monkeypatch, capsys, "user", "set", "root", "--no-admin")[0] == 0
    _, out, _ = run(tmp_path, monkeypatch, capsys, "users")
    lines = out.splitlines()
    assert lines[0].split()[-1] == "ADMIN"
    assert [line.split()[0] + " " + line.split()[-1] for line in lines[1:]] == [
        "root no", "bob yes"]
    audit = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0).audit_log()
    assert [e.detail for e in audit if e.action == "user-set"] == ["admin", "not admin"]


def test_nodes_name_the_hub_holding_each_online_node_only_when_any_has_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: T0)
    for name in ("site-a", "site-b"):
        registry.register(name, new_key().public().blob(), f"SHA256:{name}", "test")
    registry.mark_online("site-a", "192.0.2.7")  # a single hub: no hub id
    code, out, _ = run(tmp_path, monkeypatch, capsys, "nodes")
    assert code == 0 and "HUB" not in out.splitlines()[0]
    code, out, _ = run(tmp_path, monkeypatch, capsys, "nodes", "--json")
    assert [n["hub"] for n in json.loads(out)] == [None, None]
    registry.hub_id = "hub-a"
    registry.mark_online("site-a", "192.0.2.7")
    registry.close()
    code, out, _ = run(tmp_path, monkeypatch, capsys, "nodes", "--json")
    assert [(n["name"], n["hub"]) for n in json.loads(out)] == [("site-a", "hub-a"),
                                                                 ("site-b", None)]
    code, out, _ = run(tmp_path, monkeypatch, capsys, "nodes")
    head, row_a, row_b = out.splitlines()
    assert head.split()[-1] == "HUB"
    assert row_a.split()[-1] == "hub-a" and row_b.split()[-1] == "-"


@pytest.mark.parametrize(("command", "what"), [
    (("callhome-password",), "Call Home Password"),
    (("user", "add", "alice", "--password-stdin"), "password"),
])
def test_a_password_of_more_than_one_line_on_stdin_is_refused_and_nothing_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: tuple[str, ...], what: str) -> None:
    code, out, err = run(tmp_path, monkeypatch, capsys, *command, stdin=b"first\r\nsecond\n")
    assert (code, out) == (1, "")
    assert err == f"callhomehub: the {what} on stdin is 2 lines; give it alone on one line\n"
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 0.0)
    assert registry.setting("callhome_password") is None and registry.users() == []
    # The line ends after the one line are not part of it, as before.
    assert run(tmp_path, monkeypatch, capsys, *command, stdin=b"pw\r\n\n")[0] == 0
