"""Signing in and out: an operator's password, or a one-time link from `ssh alice@hub weblink`.

A password is checked by the hub's own checker (bcrypt off the reactor) within
the SSH server's bcrypt budget and per-source back-off, which web and SSH share:
guessing over one does not buy more guesses over the other. Failures are logged
as `Failed web sign-in for NAME from ADDRESS` (contrib/fail2ban matches it) and
audited. A sign-in always starts a new session with a new id.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hub.access.authlog import who
from hub.access.operators import lapsed
from hub.errors import NotFound
from hub.rules.logins import OperatorLogin
from hub.store.registry import Registry
from hub.store.rows import User
from hub.web.csrf import csrf_ok, same_origin
from hub.web.errors import ErrorResource, send_error
from hub.web.guard import SignedIn, set_session_cookie, signed_in, source
from hub.web.html import esc, page
from hub.web.later import render_later
from hub.web.needs import WebNeeds
from hub.web.sessions import WebSession

log = Logger()

MAX_NAME = 64


def logged_name(name: bytes) -> str:
    # One token in the log line, so that a name cannot fake the address fail2ban reads.
    return re.sub(r"\s", "?", who(name[:MAX_NAME])) or "?"


def form_value(request: Any, name: bytes) -> bytes:
    values = (request.args or {}).get(name) or [b""]
    return bytes(values[0])


def signin_form(message: str = "", user: str = "") -> bytes:
    note = f'<p class="error">{esc(message)}</p>' if message else ""
    return page("Sign in", f'<section class="signin"><h1>Sign in</h1>{note}'
                '<form method="post" action="/signin">'
                '<label>Operator <input name="user" autocomplete="username" required '
                f'autofocus value="{esc(user)}"></label>'
                '<label>Password <input name="password" type="password" '
                'autocomplete="current-password" required></label>'
                '<button type="submit">Sign in</button></form>'
                '<p class="hint">Operators with a key only: run <code>ssh YOU@hub weblink</code>'
                ' for a one-time sign-in link.</p></section>')


def _start(needs: WebNeeds, request: Any, login: OperatorLogin, how: str
           ) -> defer.Deferred[bytes]:
    """A new session (its row written in the registry thread), then the redirect."""
    address = source(request)

    def started(session: WebSession) -> bytes:
        set_session_cookie(request, session)
        log.info("{line}", line=f"Accepted web sign-in ({how}) for {login.user} from {address}")
        needs.calls.write(Registry.audit, f"{login.user}@{address}", "web-signin", login.user,
                          f"via web, {how}")
        request.setResponseCode(303)
        request.setHeader(b"location", b"/nodes")
        return b""

    # Whatever id the browser brought is dropped: a new one for this sign-in.
    return needs.sessions.start(login, address).addCallback(started)


class SignIn(Resource):
    def __init__(self, needs: WebNeeds) -> None:
        super().__init__()
        self.needs = needs

    def getChild(self, path: bytes, request: Any) -> Resource:
        if request.postpath:
            return ErrorResource(404, "There is no such page on this hub.")
        return LinkSignIn(self.needs, path.decode("ascii", "replace"))

    def render_GET(self, request: Any) -> int:
        def show(who: SignedIn | None) -> bytes:
            if who is not None:
                request.redirect(b"/nodes")
                return b""
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return signin_form()

        return render_later(request, signed_in(self.needs, request), show)

    def render_POST(self, request: Any) -> Any:
        if not same_origin(request):
            return send_error(request, 403, "This sign-in came from another site.")
        name = form_value(request, b"user")[:MAX_NAME]
        password = form_value(request, b"password")
        address = source(request)
        needs = self.needs
        budget = needs.budget.reserve(address)
        if budget is None:
            self._failed(name, address, "too many password checks from this address")
            return send_error(request, 429, "Too many sign-in attempts from this address or "
                              "on this hub; wait a minute and try again.")
        wait = max(budget, needs.backoff.delay(address))
        waited: defer.Deferred[Any] = (task.deferLater(needs.clock, wait, lambda: None)
                                       if wait else defer.succeed(None))
        checked = waited.addCallback(lambda _: needs.check_password(name, password))
        gone = {"gone": False}

        def cancel(_: object) -> None:
            gone["gone"] = True
            if not checked.called:
                needs.budget.refund(address)
                checked.cancel()

        request.notifyFinish().addErrback(cancel)

        def ok(login: Any) -> None:
            if gone["gone"]:
                return
            if not isinstance(login, OperatorLogin) or login.node is not None:
                return bad(Failure(UnauthorizedLogin("not an operator's plain login name")))
            render_later(request, _start(needs, request, login, "password"))
            return None

        def bad(f: Failure) -> None:
            if gone["gone"] or f.check(defer.CancelledError):
                return
            if not f.check(UnauthorizedLogin):
                log.failure("web sign-in check failed", failure=f)
            self._failed(name, address, f.getErrorMessage())
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setResponseCode(401)
            request.write(signin_form("Wrong operator name or password.",
                                      name.decode("utf-8", "replace")))
            request.finish()

        checked.addCallbacks(ok, bad)
        return NOT_DONE_YET

    def _failed(self, name: bytes, address: str, why: str) -> None:
        self.needs.backoff.failed(address)
        shown = logged_name(name)
        log.info("{line}", line=f"Failed web sign-in for {shown} from {address}")
        log.info("web sign-in refused for {user}: {why}", user=shown, why=why)
        self.needs.calls.write(Registry.audit, f"{shown}@{address}", "web-signin-failed", shown,
                               "via web")


class LinkSignIn(Resource):
    """/signin/TOKEN: GET shows a button (a link preview does not spend the token),
    POST spends it and signs in."""

    isLeaf = True

    def __init__(self, needs: WebNeeds, token: str) -> None:
        super().__init__()
        self.needs = needs
        self.token = token

    def _gone(self, request: Any) -> bytes:
        return send_error(request, 403, "This sign-in link is unknown, used or expired "
                          "(links are valid for 60 seconds, once). Run ssh YOU@hub weblink "
                          "again.")

    def render_GET(self, request: Any) -> int:
        def show(login: OperatorLogin | None) -> bytes:
            if login is None:
                return self._gone(request)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return page("Sign in", f'<section class="signin"><h1>Sign in as {esc(login.user)}'
                        f'</h1><form method="post" action="/signin/{esc(self.token)}">'
                        '<button type="submit">Sign in</button></form></section>')

        return render_later(request, self.needs.weblinks.valid(self.token), show)

    def render_POST(self, request: Any) -> Any:
        if not same_origin(request):
            return send_error(request, 403, "This sign-in came from another site.")
        needs = self.needs

        def spent(login: OperatorLogin | None) -> bytes | defer.Deferred[bytes]:
            if login is None:
                return self._gone(request)
            return needs.calls.call(operator_row, login.user).addCallback(checked, login)

        def checked(user: User | None, login: OperatorLogin) -> bytes | defer.Deferred[bytes]:
            if lapsed(login, user) is not None:
                return self._gone(request)
            return _start(needs, request, login, "one-time link")

        return render_later(request, needs.weblinks.redeem(self.token), spent)


def operator_row(registry: Registry, name: str) -> User | None:
    """In the registry thread: the operator's row, None if there is none."""
    try:
        return registry.user(name)
    except NotFound:
        return None


class SignOut(Resource):
    isLeaf = True

    def __init__(self, needs: WebNeeds) -> None:
        super().__init__()
        self.needs = needs

    def render_POST(self, request: Any) -> int:
        def out(who_: SignedIn | None) -> bytes:
            if who_ is not None and not csrf_ok(request, who_.session):
                return send_error(request, 403, "The form was stale or forged (CSRF check "
                                  "failed); reload the page and try again.", who_.viewer)
            if who_ is not None:
                self.needs.sessions.end(who_.session)
                self.needs.calls.write(Registry.audit, who_.actor, "web-signout",
                                       who_.user.name, "via web")
            set_session_cookie(request, None)
            request.setResponseCode(303)
            request.setHeader(b"location", b"/signin")
            return b""

        return render_later(request, signed_in(self.needs, request), out)
