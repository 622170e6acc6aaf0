"""Master/clone pairs: the pure rules and the registry's pair records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.conch.ssh.connection import OPEN_CONNECT_FAILED
from web_console import Console

from hub.app.cli import main
from hub.errors import NameTaken, NotFound, RegistryError
from hub.rules.pairs import Pair, active_member, covered, fleet_pairs, pair_problem
from hub.rules.routes import Refusal
from hub.store.registry import Registry

PAIR = Pair("pbx", "pbx-a", "pbx-b")


def test_the_master_is_reached_while_online_else_the_clone() -> None:
    assert active_member(PAIR, True, True) == "pbx-a"
    assert active_member(PAIR, True, False) == "pbx-a"
    assert active_member(PAIR, False, True) == "pbx-b"
    refusal = active_member(PAIR, False, False)
    assert refusal == Refusal("pair pbx is offline (master pbx-a and clone pbx-b are both "
                              "offline)", OPEN_CONNECT_FAILED)


def test_roles_are_case_insensitive() -> None:
    assert PAIR.role("PBX-A") == "master"
    assert PAIR.role("pbx-b") == "clone"
    assert PAIR.role("pbx") is None


def test_a_grant_on_the_pair_covers_its_members_not_the_other_way() -> None:
    other = Pair("lab", "lab-1", "lab-2")
    assert covered(("pbx",), [PAIR, other]) == ("pbx", "pbx-a", "pbx-b")
    assert covered(("PB*",), [PAIR, other]) == ("PB*",)  # the glob already grants both
    assert covered(("pbx-a",), [PAIR, other]) == ("pbx-a",)
    assert covered(("lab-1", "lab-2"), [PAIR, other]) == ("lab-1", "lab-2")
    assert covered((), [PAIR]) == ()


def test_a_fleet_command_takes_a_pair_only_when_no_member_matches() -> None:
    other = Pair("lab", "lab-1", "lab-2")
    assert fleet_pairs("PBX", [PAIR, other]) == [PAIR]
    assert fleet_pairs("*", [PAIR, other]) == []
    assert fleet_pairs("pbx*", [PAIR, other]) == []
    assert fleet_pairs("l?b", [PAIR, other]) == [other]


@pytest.mark.parametrize(("args", "why"), [
    (("bad name", "a", "b"), "invalid pair name 'bad name'"),
    (("a", "a", "b"), "a is the name of a node: a pair needs a name of its own"),
    (("PBX", "a", "b"), "pair PBX already exists"),
    (("p", "a", "nosuch"), "no node named 'nosuch'"),
    (("p", "a", "A"), "the master and the clone must be two different nodes"),
    (("p", "a", "pbx-b"), "node pbx-b is already the clone of pair pbx"),
    (("p", "PBX-A", "b"), "node PBX-A is already the master of pair pbx"),
])
def test_pair_add_problems(args: tuple[str, str, str], why: str) -> None:
    nodes = {"a", "b", "pbx-a", "pbx-b"}
    problem = pair_problem(*args, nodes, [PAIR])
    assert problem is not None and problem.startswith(why)
    assert pair_problem("p", "a", "b", nodes, [PAIR]) is None


@pytest.fixture
def reg(registry_at: str) -> Registry:
    reg = Registry(registry_at, now=lambda: 1000.0)
    for name in ("pbx-a", "pbx-b", "other"):
        reg.register(name, name.encode(), f"fp-{name}", "t")
    return reg


def test_registry_records_lists_and_deletes_pairs(reg: Registry) -> None:
    assert reg.add_pair("pbx", "pbx-a", "PBX-B", "cli:root") == Pair("pbx", "pbx-a", "pbx-b")
    assert reg.pairs() == [Pair("pbx", "pbx-a", "pbx-b")]
    assert reg.pair("PBX") == reg.pair_of("pbx-b") == Pair("pbx", "pbx-a", "pbx-b")
    assert reg.pair_of("other") is None
    # The pair is not a node: listings, counts and node commands leave it out.
    assert [n.name for n in reg.nodes()] == ["pbx-a", "pbx-b", "other"]
    assert reg.node_counts()["approved"] == 0
    with pytest.raises(NotFound):
        reg.node("pbx")
    for change in (lambda: reg.set_state("pbx", "revoked", "t"),
                   lambda: reg.set_public("pbx", True, "t"),
                   lambda: reg.remove("pbx", "t")):
        with pytest.raises(NotFound):
            change()
    # Its own leases are leases like a node's: unique ports, sticky.
    assert reg.lease("pbx", "ssh", 50000, 50009) == (50000, True)
    assert reg.lease("pbx-a", "ssh", 50000, 50009) == (50001, True)
    reg.set_lease_active("pbx", "ssh", True)
    assert reg.set_pair_public("pbx", True, "t") == Pair("pbx", "pbx-a", "pbx-b", True,
                                                         {"ssh": 50000}, frozenset({"ssh"}))
    with pytest.raises(RegistryError, match="node pbx-a is a member of pair pbx: delete the "
                       r"pair first \(callhomehub pair del pbx\)"):
        reg.remove("pbx-a", "t")
    reg.del_pair("pbx", "cli:root")
    assert reg.pairs() == []
    with pytest.raises(NotFound, match="no pair named 'pbx'"):
        reg.del_pair("pbx", "t")
    assert reg.lease("other", "ssh", 50000, 50009) == (50000, True)  # the pair's port is free
    reg.remove("pbx-a", "t")
    actions = [(e.action, e.target, e.detail) for e in reg.audit_log()
               if e.action.startswith("pair")]
    assert actions == [("pair-add", "pbx", "master pbx-a clone pbx-b"),
                       ("pair-del", "pbx", "")]


def test_a_pair_name_is_not_free_for_nodes_and_node_names_not_for_pairs(reg: Registry) -> None:
    reg.add_pair("pbx", "pbx-a", "pbx-b", "t")
    with pytest.raises(NameTaken, match="node name 'PBX' is the name of a master/clone pair"):
        reg.register("PBX", b"new-key", "fp", "t")
    with pytest.raises(NameTaken, match="is the name of a master/clone pair"):
        reg.register_netconf("pbx", b"host-key", "fp", "t")
    with pytest.raises(RegistryError, match="other is the name of a node"):
        reg.add_pair("other", "pbx-a", "pbx-b", "t")
    with pytest.raises(RegistryError, match="node pbx-a is already the master of pair pbx"):
        reg.add_pair("pbx2", "pbx-a", "other", "t")
    assert len(reg.pairs()) == 1


def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--data", str(tmp_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_adds_lists_and_deletes_pairs(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(str(tmp_path / "hub.sqlite3"), now=lambda: 1000.0)
    for name in ("pbx-a", "pbx-b", "other"):
        reg.register(name, name.encode(), f"fp-{name}", "t")
        reg.set_state(name, "approved", "t")
    reg.lease("pbx-b", "ssh", 50000, 50009)
    reg.mark_online("pbx-b", "192.0.2.8")
    reg.set_lease_active("pbx-b", "ssh", True)
    assert cli(tmp_path, capsys, "pair", "add", "pbx", "pbx-a", "pbx-b") == (
        0, "pair pbx: master pbx-a, clone pbx-b\n", "")
    assert cli(tmp_path, capsys, "pair", "add", "p2", "pbx-a", "other") == (
        1, "", "callhomehub: node pbx-a is already the master of pair pbx\n")
    assert cli(tmp_path, capsys, "pair", "add", "other", "pbx-a", "pbx-b")[2] == (
        "callhomehub: other is the name of a node: a pair needs a name of its own\n")
    reg.lease("pbx", "ssh", 50000, 50009)
    reg.set_lease_active("pbx", "ssh", True)
    _, out, _ = cli(tmp_path, capsys, "pairs", "--json")
    assert json.loads(out) == [{"name": "pbx", "master": "pbx-a", "clone": "pbx-b",
                                "active": "pbx-b", "public": False,
                                "forwards": {"ssh": 50001}, "leases": {"ssh": 50001}}]
    assert cli(tmp_path, capsys, "access", "pbx", "on")[1] == "pair pbx: public access on\n"
    _, out, _ = cli(tmp_path, capsys, "pairs")
    assert out.splitlines() == ["NAME  MASTER  CLONE  ACTIVE  PORTS      PUBLIC",
                                "pbx   pbx-a   pbx-b  pbx-b   ssh=50001  on"]
    _, out, _ = cli(tmp_path, capsys, "nodes", "--json")
    assert [n["pair"] for n in json.loads(out)] == [
        {"name": "pbx", "role": "master"}, {"name": "pbx", "role": "clone"}, None]
    _, out, _ = cli(tmp_path, capsys, "nodes")
    header, *rows = out.splitlines()
    assert header.endswith("  PAIR") and len(rows) == 3
    assert [r.rsplit("  ", 1)[1] for r in rows] == ["pbx (master)", "pbx (clone)", "-"]
    assert cli(tmp_path, capsys, "remove", "pbx-b")[2] == (
        "callhomehub: node pbx-b is a member of pair pbx: delete the pair first "
        "(callhomehub pair del pbx)\n")
    assert cli(tmp_path, capsys, "pair", "del", "pbx") == (0, "pair pbx deleted\n", "")
    assert cli(tmp_path, capsys, "pairs", "--json")[1] == "[]\n"
    assert [(e.action, e.target) for e in reg.audit_log() if e.action != "lease"][-3:] == [
        ("pair-add", "pbx"), ("access", "pbx"), ("pair-del", "pbx")]


def test_the_web_console_lists_pairs_and_shows_a_members_pair(tmp_path: Path) -> None:
    console = Console(tmp_path)
    console.add_operator("alice", "alice-pw", ["pbx"])
    console.add_operator("carol", "carol-pw", ["pbx-*"])
    console.add_operator("root", "root-pw", [], admin=True)
    for name in ("pbx-a", "pbx-b", "other"):
        console.add_node(name)
    console.hub.registry.add_pair("pbx", "pbx-a", "pbx-b", "t")
    alice = console.browser()
    assert alice.sign_in("alice", "alice-pw").status == 303
    listing = alice.get("/nodes").text
    # The pair is not a node row; it is listed under the nodes, with what it reaches.
    assert "<td>pbx</td>" in listing and "none (offline)" in listing
    assert '<a href="/nodes/pbx-a">pbx-a</a>' in listing
    page = alice.get("/nodes/pbx-b").text  # a grant on the pair covers its members
    assert "clone of pair <b>pbx</b>" in page and "the pair reaches none (offline) now" in page
    carol = console.browser()
    assert carol.sign_in("carol", "carol-pw").status == 303
    assert "<td>pbx</td>" not in carol.get("/nodes").text  # members only: not the pair
    root = console.browser()
    assert root.sign_in("root", "root-pw").status == 303
    token = root.csrf("/nodes/pbx-a")
    refused = root.post("/nodes/pbx-a/remove", {"csrf": token})
    assert refused.status == 409 and "member of pair pbx" in refused.text
