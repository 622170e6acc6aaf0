"""Answering a request once its registry read has come back (hub.web.later): the
answer, a browser gone meanwhile, a failed read; and the console's actions, which
answer only once the hub has applied the change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from web_console import Console, parse

from hub.errors import RegistryError
from hub.web.later import Later, render_later
from hub.web.sessions import COOKIE
from hub.web.site import console_site


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The web console's log lines, and any failure logged from anywhere (an
    unhandled error). Other lines are left out: SSH connections of earlier tests
    in this process may still be logging on the same reactor."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if not (str(event.get("log_namespace", "")).startswith("hub.web")
                or "log_failure" in event or event.get("isError")):
            return
        lines.append(formatEvent(event) + ("\n" + str(event["log_failure"].getTraceback())
                                           if "log_failure" in event else ""))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_the_answer_is_written_when_the_read_comes_back() -> None:
    request = DummyRequest([b"nodes"])
    read: defer.Deferred[str] = defer.Deferred()
    assert render_later(request, read, lambda rows: f"<p>{rows}</p>".encode()) == NOT_DONE_YET
    assert request.written == [] and not request.finished
    read.callback("three nodes")
    assert b"".join(request.written) == b"<p>three nodes</p>" and request.finished
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"18"]


def test_a_browser_gone_before_the_read_answers_gets_nothing(logged: list[str]) -> None:
    request = DummyRequest([b"nodes"])
    read: defer.Deferred[str] = defer.Deferred()
    rendered: list[str] = []

    def render(rows: str) -> bytes:
        rendered.append(rows)
        return b"page"

    render_later(request, read, render)
    request.processingFailed(Failure(ConnectionLost("the browser closed the tab")))
    read.callback("rows")
    assert rendered == [] and request.written == [] and not request.finished
    later: defer.Deferred[str] = defer.Deferred()
    gone = DummyRequest([b"audit"])
    render_later(gone, later, render)
    gone.processingFailed(Failure(ConnectionLost()))
    later.errback(RegistryError("database is locked"))  # logged, nothing written
    assert gone.written == [] and [line for line in logged if "database is locked" in line]


def test_a_failed_read_is_a_500_page_and_one_log_line(logged: list[str]) -> None:
    request = DummyRequest([b"nodes"])
    request.uri = b"/nodes?q=site"
    read: defer.Deferred[str] = defer.Deferred()
    render_later(request, read, lambda rows: b"never")
    read.errback(RegistryError("database is locked"))
    body = b"".join(request.written)
    assert request.responseCode == 500 and request.finished
    assert b"<h1>500 Internal error</h1>" in body and b"Traceback" not in body
    assert b"database is locked" not in body and b"in its log" in body
    assert logged == ["web: GET /nodes?q=site failed: database is locked"]


def test_a_render_that_raises_is_a_500_page_too(logged: list[str]) -> None:
    request = DummyRequest([b"nodes"])
    request.uri = b"/nodes"

    def render(rows: str) -> bytes:
        raise KeyError("state")

    render_later(request, defer.succeed("rows"), render)
    assert request.responseCode == 500 and b"Traceback" not in b"".join(request.written)
    assert logged == ["web: GET /nodes failed: 'state'"]


def test_later_finds_the_resource_then_the_rest_of_the_path_below_it() -> None:
    class Leaf(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"/".join(request.postpath)

    class Node(Resource):
        def getChild(self, path: bytes, request: Any) -> Resource:
            return Leaf() if path == b"terminal" else Resource()

    found: defer.Deferred[Resource] = defer.Deferred()
    request = DummyRequest([b"terminal", b"socket"])
    assert Later(lambda _: found).render(request) == NOT_DONE_YET
    assert request.written == []
    found.callback(Node())
    assert request.written == [b"socket"] and request.finished


def test_an_action_answers_once_the_hub_has_applied_it(tmp_path: Path) -> None:
    console = Console(tmp_path)
    console.add_operator("root", "root-pw", [], admin=True)
    console.add_node("site-a")
    applying: defer.Deferred[None] = defer.Deferred()
    console.site = console_site(attrs.evolve(console.needs, apply=lambda: applying))
    b = console.browser()
    b.sign_in("root", "root-pw")
    token = b.csrf("/nodes/site-a")
    body = f"value=on&csrf={token}".encode()
    transport, _ = console.connect(
        b"POST /nodes/site-a/access HTTP/1.1\r\nHost: hub.example\r\nConnection: close\r\n"
        + f"Cookie: {COOKIE.decode()}={b.cookie}\r\n".encode()
        + b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body, "192.0.2.7")
    console.clock.advance(1)
    assert transport.value() == b""  # written, not yet applied: no answer
    assert console.hub.registry.node("site-a").public
    applying.callback(None)
    answer = parse(transport.value())
    assert answer.status == 303 and answer.header("location") == "/nodes/site-a"


def test_an_action_whose_apply_fails_still_answers_and_says_so(tmp_path: Path,
                                                              logged: list[str]) -> None:
    console = Console(tmp_path)
    console.add_operator("root", "root-pw", [], admin=True)
    console.add_node("site-a")
    console.site = console_site(attrs.evolve(
        console.needs, apply=lambda: defer.fail(RegistryError("database is locked"))))
    b = console.browser()
    b.sign_in("root", "root-pw")
    r = b.post("/nodes/site-a/revoke", {"csrf": b.csrf("/nodes/site-a")})
    assert r.status == 303 and console.hub.registry.node("site-a").state == "revoked"
    assert [line for line in logged if "site-a: the change is written but applying it "
            "failed: database is locked" in line]
