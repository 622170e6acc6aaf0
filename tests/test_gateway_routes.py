"""Routing an operator's request: pure values in, a Route or a Refusal out."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED

from hub.rules.routes import Refusal, Route, reach, route, session_route, tunnel_refusal
from hub.store.registry import NETCONF, Node

GRANTS = ("site-*",)


def node(name: str = "site-a", **kw: Any) -> Node:
    fields: dict[str, Any] = dict(
        id=1, name=name, kind="device", key_blob=b"k", fingerprint="fp", state="approved",
        created=0.0, last_seen=None, peer="", online=True, online_since=None, public=False,
        device_user="root", host_key=b"hostkey", forwards={"ssh": 50000}, console=None)
    return Node(**{**fields, **kw})


def test_reach_refuses_unknown_and_not_granted_alike() -> None:
    unknown = Refusal("node 'site-a' does not exist or you may not reach it")
    assert reach(None, node(), "site-a") == unknown  # no such operator
    assert reach(GRANTS, None, "site-a") == unknown
    assert reach(("lab-*",), node(), "site-a") == attrs.evolve(
        unknown, note="not granted node site-a")
    assert unknown.reason == OPEN_ADMINISTRATIVELY_PROHIBITED
    assert reach(GRANTS, node(state="pending"), "site-a") == Refusal(
        "node site-a is pending, not approved")
    assert reach(GRANTS, node(), "SITE-A") == node()


def test_tunnel_refusals() -> None:
    assert tunnel_refusal("alice", node(), True) is None
    assert tunnel_refusal("alice", node(), False) == Refusal("node site-a is offline",
                                                             OPEN_CONNECT_FAILED)
    assert tunnel_refusal("alice", node(kind=NETCONF), True) == Refusal(
        "node site-a is a NETCONF device: use ssh -s alice:site-a@hub netconf")


@pytest.mark.parametrize(("kind", "data", "label"), [
    (b"shell", b"", "shell"), (b"exec", NS(b"uptime"), "exec"),
    (b"subsystem", NS(b"sftp"), "subsystem")])
def test_session_routes(kind: bytes, data: bytes, label: str) -> None:
    assert session_route("alice", node(), True, kind, data, None) == Route(
        "site-a", "root", (kind, data), label, b"hostkey")


def test_serial_port_and_console_template() -> None:
    assert session_route("alice", node(), True, b"shell", b"", "port02") == Route(
        "site-a", "root:port02", (b"shell", b""), "console port02", b"hostkey")
    templated = node(console="pmshell -l {port}")
    assert session_route("alice", templated, True, b"shell", b"", "port02") == Route(
        "site-a", "root", (b"exec", NS(b"pmshell -l port02")), "console port02", b"hostkey")


def test_session_refusals() -> None:
    assert session_route("alice", node(), False, b"shell", b"", None) == Refusal(
        "node site-a is offline", OPEN_CONNECT_FAILED)
    assert session_route("alice", node(host_key=None), True, b"shell", b"", None) == Refusal(
        "node site-a is not enrolled: run callhomehub approve or enroll")


def test_netconf_nodes_offer_only_their_subsystem() -> None:
    router = node("router1", kind=NETCONF, host_key=None)
    only = Refusal("node router1 is a NETCONF device: only its netconf subsystem is offered "
                   "(ssh -s alice:router1@hub netconf)")
    for kind, data, port in [(b"shell", b"", None), (b"subsystem", NS(b"sftp"), None),
                             (b"subsystem", NS(b"netconf"), "port1"), (b"subsystem", b"", None),
                             (b"subsystem", b"\x00\x00", None)]:
        assert session_route("alice", router, True, kind, data, port) == only
    assert session_route("alice", router, False, b"subsystem", NS(b"netconf"), None) == Refusal(
        "node router1 is offline", OPEN_CONNECT_FAILED)
    assert session_route("alice", router, True, b"subsystem", NS(b"netconf"), None) == Route(
        "router1", "", (b"subsystem", NS(b"netconf")), "netconf", netconf=True)


def test_route_checks_reach_first() -> None:
    assert route("alice", GRANTS, None, "nosuch", True, b"shell", b"", None) == Refusal(
        "node 'nosuch' does not exist or you may not reach it")
    assert route("alice", GRANTS, node(), "site-a", True, b"shell", b"", None) == Route(
        "site-a", "root", (b"shell", b""), "shell", b"hostkey")
