"""Fleet commands (`callhomehub run`): node selection, outcomes, concurrency and
deadlines, and the hub's side of the control request, in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memory_gateway import DeviceSSHD, Site
from twisted.internet import defer

from hub.access.fleet import run_on_nodes
from hub.app.control import Controller
from hub.rules.fleet import ERROR, FAILED, OFFLINE, OK, TIMEOUT, Outcome, select, tally


def test_select_takes_approved_matching_nodes_case_insensitively() -> None:
    nodes = [("Site-A", "approved", True), ("site-b", "approved", False),
             ("site-c", "pending", True), ("lab-1", "approved", True),
             ("site-d", "revoked", False)]
    assert select("SITE-*", nodes) == (["Site-A"], ["site-b"])
    assert select("*", nodes) == (["Site-A", "lab-1"], ["site-b"])
    assert select("nomatch", nodes) == ([], [])


def test_tally_counts_every_kind_and_outcomes_round_trip_through_json() -> None:
    outcomes = [Outcome("a", OK, 0, "x\n"), Outcome("b", FAILED, 2, "", "boom"),
                Outcome("c", OFFLINE, message="no tunnel now")]
    assert tally(outcomes) == {OK: 1, FAILED: 1, OFFLINE: 1, TIMEOUT: 0, ERROR: 0}
    assert [Outcome.from_json(o.as_json()) for o in outcomes] == outcomes


def test_at_most_parallel_nodes_run_at_once_and_each_is_reported_when_it_ends() -> None:
    pending: dict[str, defer.Deferred[Outcome]] = {}
    running: list[int] = []

    def start(name: str) -> defer.Deferred[Outcome]:
        pending[name] = defer.Deferred()
        running.append(len([d for d in pending.values() if not d.called]))
        return pending[name]

    emitted: list[str] = []
    done = run_on_nodes([f"n{i}" for i in range(7)], start, 3, lambda o: emitted.append(o.node))
    assert sorted(pending) == ["n0", "n1", "n2"]
    pending["n1"].callback(Outcome("n1", OK, 0))
    assert emitted == ["n1"] and "n3" in pending
    for _ in range(10):
        for name, d in list(pending.items()):
            if not d.called:
                d.callback(Outcome(name, OK, 0))
    assert max(running) == 3
    assert [o.node for o in done.result] == [f"n{i}" for i in range(7)]
    assert sorted(emitted) == [f"n{i}" for i in range(7)]


def run(site: Site, **request: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []
    d = defer.ensureDeferred(Controller(site.hub).run(
        {"actor": "cli:test", **request}, lines.append))
    for _ in range(20):
        site.settle()
        if d.called:
            break
        site.clock.advance(1)
    assert d.called, "the run never ended"
    return d.result, lines


def outcomes(lines: list[dict[str, Any]]) -> dict[str, Outcome]:
    return {o.node: o for o in (Outcome.from_json(line["outcome"])
                                for line in lines if "outcome" in line)}


def test_a_run_reports_each_node_ok_failed_offline_or_not_enrolled(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.call_home(site.enroll("site-b", site.sshd), site.sshd, "192.0.2.21")
    site.enroll("site-off", site.sshd)                           # approved, never called home
    site.call_home(site.enroll("site-new", site.sshd, pin=False), site.sshd, "192.0.2.22")
    site.hub.registry.register("site-pending", b"\x00\x00\x00\x01k", "fp2", "test")

    answer, lines = run(site, nodes="SITE-*", command="uname -a", parallel=2, timeout=30)
    got = outcomes(lines)
    assert lines[0] == {"plan": {"nodes": 4, "offline": 1}}
    assert sorted(got) == ["site-a", "site-b", "site-new", "site-off"]
    assert got["site-a"] == Outcome("site-a", OK, 0, "ran uname -a as root\n")
    assert got["site-off"].status == OFFLINE
    assert got["site-new"].status == ERROR and "not enrolled" in got["site-new"].message
    assert answer["ok"] and answer["summary"] == {OK: 2, FAILED: 0, OFFLINE: 1,
                                                  TIMEOUT: 0, ERROR: 1}
    (entry,) = [e for e in site.hub.registry.audit_log() if e.action == "run"]
    assert (entry.actor, entry.target) == ("cli:test", "SITE-*")
    assert "uname -a" in entry.detail and "ok 2" in entry.detail and "offline 1" in entry.detail

    answer, lines = run(site, nodes="site-a", command="hello")
    assert outcomes(lines)["site-a"] == Outcome("site-a", FAILED, 3, "hello from root\n",
                                                "err\n")


def test_a_node_that_does_not_finish_in_time_is_timed_out_and_its_login_closed(
        tmp_path: Path) -> None:
    site = Site(tmp_path)
    _, lines = run(site, nodes="site-a", command="cat", timeout=5)
    (outcome,) = outcomes(lines).values()
    assert outcome.status == TIMEOUT and outcome.message == "no answer within 5 s"
    site.settle()
    (session,) = site.sshd.sessions
    assert session.id not in session.conn.channels, "the device session was left open"


def test_a_device_that_refuses_the_login_is_an_error_not_a_hang(tmp_path: Path) -> None:
    site = Site(tmp_path)
    other = DeviceSSHD(site.clock, site.hub.keys.mgmt)
    # Pinned to another device's host key: the hub must refuse to log in.
    site.hub.registry.set_device_access("site-a", "test",
                                        host_key=other.host_key.public().blob())
    _, lines = run(site, nodes="site-a", command="uname")
    (outcome,) = outcomes(lines).values()
    assert outcome.status == ERROR and "host key changed" in outcome.message


def test_bad_requests_are_refused_with_a_reason(tmp_path: Path) -> None:
    site = Site(tmp_path)
    for request, why in (({"command": " "}, "no command"),
                         ({"command": "x", "parallel": 0}, "--parallel"),
                         ({"command": "x", "timeout": 0}, "--timeout")):
        d = defer.ensureDeferred(Controller(site.hub).handle(
            {"op": "run", **request}, lambda line: None))
        assert not d.result["ok"] and why in d.result["message"]
