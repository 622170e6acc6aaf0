"""`callhomehub sessions` and `replay`, and the `[recordings]` config section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from memory_gateway import PTY
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from hub.access.recordings import open_recordings
from hub.app.cli import main
from hub.app.config import build_config
from hub.errors import ConfigError
from hub.rules.retention import RetentionRules
from hub.store.registry import Registry


def test_recordings_config_defaults_and_section(tmp_path: Path) -> None:
    config = build_config({"data": str(tmp_path)})
    assert config.recordings_enabled is True
    assert config.recordings == RetentionRules(max_age_days=90, max_total_mb=1024)
    assert config.recordings_dir == str(tmp_path / "recordings")
    (tmp_path / "callhomehub.toml").write_text(
        "[recordings]\nenabled = false\nmax_age_days = 7\nmax_total_mb = 0.5\n")
    config = build_config({"data": str(tmp_path)})
    assert config.recordings_enabled is False
    assert config.recordings == RetentionRules(max_age_days=7, max_total_mb=0.5)


@pytest.mark.parametrize(("text", "message"), [
    ("[recordings]\nmax_age_days = 0\n", "[recordings] max_age_days and max_total_mb must be > 0"),
    ("[recordings]\nmax_total_mb = -1\n", "[recordings] max_age_days and max_total_mb"),
    ('[recordings]\nenabled = "yes"\n', "[recordings] enabled has the wrong type"),
    ("[recordings]\nmax_age = 3\n", "unknown key 'max_age' in [recordings]"),
])
def test_bad_recordings_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{message.replace('[', '.').replace(']', '.')}"):
        build_config({"data": str(tmp_path), "config": str(path)})


def recorded_hub(tmp_path: Path) -> tuple[int, int]:
    """Two sessions on file as the hub leaves them: a recorded shell and an exec."""
    clock = MemoryReactorClock()
    clock.advance(1764640000.0)
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    recordings = open_recordings(registry, str(tmp_path / "recordings"), clock,
                                 lambda f, *a: defer.maybeDeferred(f, *a), RetentionRules())
    shell = recordings.begin("alice", "site-a", "192.0.2.1", "shell", (b"shell", b""), PTY)
    shell.output(b"root# ")
    clock.advance(2)
    shell.output(b"ls\r\n\xff\xfe caf\xc3")
    shell.output(b"\xa9\r\n")
    shell.exited(b"exit-status", b"\0\0\0\x02")
    shell.finish(3, 22)
    run = recordings.begin("bob", "site-b", "192.0.2.2", "exec",
                           (b"exec", b"\0\0\0\x06uptime"), None)
    run.finish(0, 40)
    registry.close()
    return shell.id, run.id


def test_sessions_lists_json_and_table(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    shell, run = recorded_hub(tmp_path)
    assert main(["--data", str(tmp_path), "sessions", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [shell, run]
    first = rows[0]
    assert first == {
        "id": shell, "node": "site-a", "user": "alice", "start": "2025-12-02T01:46:40Z",
        "end": "2025-12-02T01:46:42Z", "exit": 2, "signal": None, "source": "192.0.2.1",
        "kind": "shell", "command": None, "recording": first["recording"],
        "truncated": False, "bytes": {"to_device": 3, "from_device": 22}}
    assert first["recording"].endswith(f"recordings/{shell:06d}-site-a.cast")
    assert (rows[1]["kind"], rows[1]["command"], rows[1]["recording"]) == ("exec", "uptime",
                                                                           None)
    assert main(["--data", str(tmp_path), "sessions", "--node", "SITE-B", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [run]
    assert main(["--data", str(tmp_path), "sessions", "--user", "alice"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "NODE", "USER", "KIND", "SOURCE", "START", "END", "EXIT",
                                "BYTES", "RECORDING"]
    assert len(table) == 2 and table[1].split()[:4] == [str(shell), "site-a", "alice", "shell"]


def test_replay_writes_the_exact_bytes(tmp_path: Path,
                                       capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    shell, run = recorded_hub(tmp_path)
    assert main(["--data", str(tmp_path), "replay", str(shell), "--speed", "0"]) == 0
    assert capsysbinary.readouterr().out == b"root# ls\r\n\xff\xfe caf\xc3\xa9\r\n"
    assert main(["--data", str(tmp_path), "replay", str(run)]) == 1
    assert capsysbinary.readouterr().err == (
        f"callhomehub: replay: session {run} (exec on site-b) has no recording (no pty, "
        "recording off, or removed by retention)\n").encode()
    assert main(["--data", str(tmp_path), "replay", "99"]) == 1
    assert capsysbinary.readouterr().err == b"callhomehub: replay: no session 99\n"
    assert main(["--data", str(tmp_path), "replay", str(shell), "--speed", "-1"]) == 1
    assert b"--speed must be 0 or more" in capsysbinary.readouterr().err
