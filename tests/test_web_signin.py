"""Signing in to the web console: passwords, sessions, cookies, one-time links, back-off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.logger import LogEvent, formatEvent
from web_console import Console, parse

from hub.web.sessions import COOKIE


def lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


@pytest.fixture
def console(tmp_path: Path) -> Console:
    c = Console(tmp_path)
    c.add_operator("alice", "alice-pw", ["site-*"])
    c.add_operator("root", "root-pw", [], admin=True)
    return c


def test_sign_in_sets_one_strict_cookie_and_signs_out(console: Console) -> None:
    b = console.browser()
    assert b.get("/nodes").header("location") == "/signin"
    r = b.sign_in("alice", "alice-pw")
    assert r.status == 303 and r.header("location") == "/nodes"
    [cookie] = r.cookies()
    assert cookie.startswith(f"{COOKIE.decode()}=")
    flags = {f.strip().lower() for f in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    assert not any(f.startswith("domain") or f.startswith("expires") for f in flags)
    assert len(b.cookie or "") >= 43  # 256 bits, base64
    page = b.get("/nodes")
    assert page.status == 200 and "alice" in page.text
    token = b.csrf()
    out = b.post("/signout", {"csrf": token})
    assert out.status == 303 and b.cookie is None
    assert b.get("/nodes").header("location") == "/signin"
    actions = [e.action for e in console.hub.registry.audit_log()]
    assert "web-signin" in actions and "web-signout" in actions


def test_no_session_fixation_a_new_id_at_every_sign_in(console: Console) -> None:
    b = console.browser()
    b.cookie = "attacker-chosen-id"
    b.sign_in("alice", "alice-pw")
    assert b.cookie not in (None, "attacker-chosen-id")
    first = b.cookie
    b.sign_in("alice", "alice-pw")
    assert b.cookie != first


def test_wrong_password_is_logged_audited_and_backs_off(console: Console,
                                                       logged: list[LogEvent]) -> None:
    b = console.browser("198.51.100.9")
    r = b.sign_in("alice", "nope")
    assert r.status == 401 and "Wrong operator name or password" in r.text
    assert b.cookie is None
    assert "Failed web sign-in for alice from 198.51.100.9" in lines(logged)
    [entry] = [e for e in console.hub.registry.audit_log() if e.action == "web-signin-failed"]
    assert entry.actor == "alice@198.51.100.9" and entry.detail == "via web"
    # The next try from that address waits (the SSH server's back-off, shared).
    assert console.factory.backoff.delay("198.51.100.9") > 0
    # A name cannot fake the address in the line fail2ban reads.
    b.sign_in("x from 10.0.0.1", "nope")
    assert "Failed web sign-in for x?from?10.0.0.1 from 198.51.100.9" in lines(logged)


def test_the_bcrypt_budget_refuses_a_flood(console: Console) -> None:
    """Twelve sign-ins at once from one address: the SSH server's bcrypt budget
    (6 at once, 20 a minute per source) refuses those it could not run within 10 s."""
    body = b"user=alice&password=guess"
    request = (b"POST /signin HTTP/1.1\r\nHost: hub.example\r\nConnection: close\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sent = [console.send(request, "198.51.100.10") for _ in range(12)]
    refused = [t for t in sent if t.value().startswith(b"HTTP/1.1 429")]
    assert refused and b"Too many sign-in attempts" in refused[0].value()
    console.clock.pump([1.0] * 60)
    answered = [parse(t.value()).status for t in sent if t not in refused]
    assert answered and set(answered) == {401}


def test_registrar_and_node_logins_are_not_operators(console: Console) -> None:
    b = console.browser()
    assert b.sign_in("cms", "secret").status == 401  # the Call Home Password
    assert b.sign_in("alice:site-a", "alice-pw").status == 401
    assert b.cookie is None


def test_sessions_expire_idle_and_absolute(console: Console) -> None:
    b = console.browser()
    b.sign_in("alice", "alice-pw")
    console.clock.advance(1700)
    assert b.get("/nodes").status == 200
    console.clock.advance(1801)
    assert b.get("/nodes").header("location") == "/signin"
    b.sign_in("alice", "alice-pw")
    for _ in range(25):  # used every 29 minutes: idle never, absolute after 12 h
        console.clock.advance(1740)
        if b.get("/nodes").status != 200:
            break
    assert console.clock.seconds() >= 43200
    assert b.get("/nodes.json").status == 401


def test_a_session_ends_when_its_operator_changes(console: Console) -> None:
    b = console.browser()
    b.sign_in("alice", "alice-pw")
    from hub.access.auth import hash_password

    console.hub.registry.set_user("alice", "test", password_hash=hash_password(b"new", rounds=4))
    assert b.get("/nodes").header("location") == "/signin"
    b.sign_in("alice", "new")
    console.hub.registry.del_user("alice", "test")
    assert b.get("/nodes").header("location") == "/signin"


def test_one_time_link_signs_in_once(console: Console) -> None:
    login = console.hub.registry.user("alice")
    from hub.rules.logins import OperatorLogin

    url = console.hub.weblinks.issue(  # type: ignore[union-attr]
        OperatorLogin("alice", None, None, identity=login.identity,
                      credential=login.password_hash), "203.0.113.1")
    assert re.fullmatch(r"https://203\.0\.113\.1:8443/signin/[A-Za-z0-9_-]{43}", url)
    path = url.split("8443", 1)[1]
    b = console.browser()
    shown = b.get(path)  # a preview does not spend it
    assert shown.status == 200 and "Sign in as alice" in shown.text
    assert b.post(path).status == 303 and b.cookie
    assert console.browser().post(path).status == 403  # spent
    other = console.hub.weblinks.issue(  # type: ignore[union-attr]
        OperatorLogin("alice", None, None, identity=login.identity,
                      credential=login.password_hash), "hub.example")
    console.clock.advance(61)
    assert console.browser().post(other.split("hub.example:8443", 1)[1]).status == 403


def test_port_443_is_left_out_of_the_link(tmp_path: Path) -> None:
    c = Console(tmp_path)
    c.port = 443
    from hub.rules.logins import OperatorLogin

    assert c.hub.weblinks.issue(OperatorLogin("a", None, None), "::1").startswith(  # type: ignore[union-attr]
        "https://[::1]/signin/")


def test_after_a_failure_the_next_sign_in_from_that_address_waits(console: Console) -> None:
    body = b"user=alice&password=alice-pw"
    request = (b"POST /signin HTTP/1.1\r\nHost: hub.example\r\nConnection: close\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    console.browser("198.51.100.11").sign_in("alice", "wrong")
    waiting = console.send(request, "198.51.100.11")
    elsewhere = console.send(request, "198.51.100.12")
    assert waiting.value() == b"" and elsewhere.value().startswith(b"HTTP/1.1 303")
    console.clock.advance(0.9)
    assert waiting.value() == b""
    console.clock.advance(0.2)
    assert waiting.value().startswith(b"HTTP/1.1 303")  # the right password, a second later
