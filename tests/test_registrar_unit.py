from __future__ import annotations

from pathlib import Path

import pytest
from memory_hub import make_hub, new_key, outcome
from twisted.internet.testing import MemoryReactorClock

from hub.access.registrar import Outcome, register
from hub.app.context import Hub
from hub.errors import BadName
from hub.rules.names import check_node_name, default_node_name
from hub.ssh.keys import parse_public_key


def pub_line(comment: str = "") -> bytes:
    return new_key().public().toString("openssh", comment=comment.encode()) + b"\n"


@pytest.mark.parametrize(("comment", "expected"), [
    ("site-a", "site-a"), ("root@gw-17", "gw-17"), ("", None), ("two words", None),
])
def test_default_node_name(comment: str, expected: str | None) -> None:
    key = parse_public_key(pub_line(comment))
    name = default_node_name(key)
    if expected is None:
        assert name.startswith("node-") and len(name) == 17
    else:
        assert name == expected


@pytest.mark.parametrize("name", ["a:b", "-x", "", "x" * 64, "white space", "a/b", "nlname\n",
                                  "a\nb"])
def test_bad_node_names(name: str) -> None:
    with pytest.raises(BadName):
        check_node_name(name)


def run(hub: Hub, args: list[str], line: bytes, actor: str) -> Outcome:
    return outcome(hub, register(hub.registrar_needs(), args, line, actor))


def test_register_outcomes(tmp_path: Path) -> None:
    hub = make_hub(tmp_path, MemoryReactorClock())
    line = pub_line("x")
    ok = run(hub, ["site-a"], line, "t")
    assert (ok.status, ok.stdout) == (0, hub.keys.mgmt_public_line.encode())
    assert ok.stderr == b"register: node site-a is pending approval on the hub\n"
    assert run(hub, ["site-a"], line, "t").status == 0
    moved = run(hub, ["other"], line, "t")
    assert (moved.status, moved.stderr) == (
        0, b"register: this key is already registered as node site-a "
           b"(pending approval on the hub)\n")
    hub.registry.set_state("site-a", "approved", "t")
    assert run(hub, ["site-a"], line, "t").stderr == (
        b"register: node site-a is approved\n")
    assert run(hub, ["site-a"], pub_line(), "t").status == 1
    assert run(hub, ["a", "b"], line, "t").stderr.startswith(b"usage:")
    hub.registry.set_state("site-a", "revoked", "t")
    revoked = run(hub, [], line, "t")
    assert revoked.status == 1 and b"revoked" in revoked.stderr
