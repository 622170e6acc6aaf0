"""The web console's part of the registry: signed-in browsers and one-time sign-in links.

Every hub and worker on one registry reads the same rows, so a session or a link
made on one works on any other, and a restart signs no one out. Only the SHA-256
of a session id, of a proxy cookie and of a link token is stored (`token_hash`):
a copy of the registry lets no one sign in. The lifetimes are decided by the
caller (`hub.web.sessions`, `hub.web.weblinks`); these methods only keep rows.
Mixed into `hub.store.registry.Registry`; every method is one statement or one
transaction, so the registry thread that will run them needs nothing more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from attrs import frozen

from hub.rules.logins import OperatorLogin
from hub.store.engine import Database

_LOGIN = ("user_name", "login_id", "login_created", "credential")
_SESSION = ("id_hash", *_LOGIN, "address", "created", "used", "expires")
_SESSIONS = f"SELECT {', '.join(_SESSION)} FROM web_sessions"  # noqa: S608 (constants)


def token_hash(token: str) -> str:
    """What the registry keeps of a secret token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def credential_text(credential: bytes | str | None) -> str:
    """An `OperatorLogin.credential` as a column: the public key it logged in with,
    or the bcrypt hash of the password (the users row holds the same hash)."""
    if isinstance(credential, bytes):
        return "key:" + base64.b64encode(credential).decode("ascii")
    if isinstance(credential, str):
        return "password:" + credential
    return ""


def credential_value(text: str) -> bytes | str | None:
    kind, _, value = text.partition(":")
    if kind == "key":
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return b"?"  # matches no key: the session lapses, as with a removed key
    if kind == "password":
        return value
    return None


def _login_values(login: OperatorLogin) -> tuple[Any, ...]:
    uid, created = login.identity if login.identity is not None else (None, None)
    return (login.user, uid, created, credential_text(login.credential))


def _login(user: str, uid: int | None, created: float | None, credential: str) -> OperatorLogin:
    identity = None if uid is None or created is None else (int(uid), float(created))
    return OperatorLogin(user, identity=identity, credential=credential_value(credential))


@frozen
class WebSessionRow:
    id_hash: str
    login: OperatorLogin
    address: str
    created: float
    used: float      # written at most once a minute (hub.web.sessions.USED_EVERY)
    expires: float   # the absolute expiry


def _session(row: tuple[Any, ...]) -> WebSessionRow:
    id_hash, user, uid, created, credential, address, started, used, expires = row
    return WebSessionRow(id_hash, _login(user, uid, created, credential), address,
                         float(started), float(used), float(expires))


class WebSessionRecords:
    """Web sessions and sign-in links; every method is one transaction of the registry."""

    _db: Database
    _tx: Callable[..., AbstractContextManager[Database]]

    # -- sessions ---------------------------------------------------------

    def web_session_add(self, session_id: str, browse: str, login: OperatorLogin,
                        address: str, now: float, expires: float, keep: int) -> None:
        """A new session; beyond `keep` sessions the oldest end."""
        with self._tx(notify=False) as db:
            db.execute(f"INSERT INTO web_sessions ({', '.join(_SESSION)}, browse_hash)"  # noqa: S608
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (token_hash(session_id), *_login_values(login), address, now, now,
                        expires, token_hash(browse)))
            (count,) = db.execute("SELECT COUNT(*) FROM web_sessions").fetchone()
            if count > keep:
                db.execute("DELETE FROM web_sessions WHERE id_hash IN (SELECT id_hash"
                           " FROM web_sessions ORDER BY created LIMIT ?)", (count - keep,))

    def web_session(self, session_id: str) -> WebSessionRow | None:
        """The session whose cookie is `session_id`, expired or not."""
        row = self._db.execute(f"{_SESSIONS} WHERE id_hash = ?",
                               (token_hash(session_id),)).fetchone()
        return None if row is None else _session(row)

    def web_session_by_browse(self, browse: str) -> WebSessionRow | None:
        """The session whose device web UI proxy cookie is `browse`, expired or not."""
        row = self._db.execute(f"{_SESSIONS} WHERE browse_hash = ?",
                               (token_hash(browse),)).fetchone()
        return None if row is None else _session(row)

    def web_session_used(self, id_hash: str, now: float, unless_since: float) -> None:
        """The session was used at `now`, written only if its last write was at or
        before `unless_since` (two hubs doing it at once write it once)."""
        with self._tx(notify=False) as db:
            db.execute("UPDATE web_sessions SET used = ? WHERE id_hash = ? AND used <= ?",
                       (now, id_hash, unless_since))

    def web_session_end(self, id_hash: str) -> None:
        with self._tx(notify=False) as db:
            db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (id_hash,))

    def web_sessions_of(self, user: str) -> list[WebSessionRow]:
        """The sessions of `user` (any case), oldest first."""
        return [_session(row) for row in self._db.execute(
            f"{_SESSIONS} WHERE lower(user_name) = lower(?) ORDER BY created", (user,))]

    # -- one-time links ---------------------------------------------------

    def web_link_add(self, token: str, login: OperatorLogin, expires: float) -> None:
        with self._tx(notify=False) as db:
            db.execute("INSERT INTO web_links (token_hash, user_name, login_id, login_created,"
                       " credential, expires) VALUES (?, ?, ?, ?, ?, ?)",
                       (token_hash(token), *_login_values(login), expires))

    def web_link(self, token: str, now: float) -> OperatorLogin | None:
        """The login of an unspent link that expires after `now` (not spent)."""
        row = self._db.execute(
            f"SELECT {', '.join(_LOGIN)} FROM web_links"  # noqa: S608 (constants)
            " WHERE token_hash = ? AND expires > ?", (token_hash(token), now)).fetchone()
        return None if row is None else _login(*row)

    def web_link_spend(self, token: str, now: float) -> OperatorLogin | None:
        """Spend a link: its login, or None (unknown, spent, expired). Deleting the row
        is the spend: of two hubs spending it at once, one deletes it, the other
        deletes nothing and gets None."""
        key = token_hash(token)
        with self._tx(notify=False) as db:
            row = db.execute(
                f"SELECT {', '.join(_LOGIN)}, expires FROM web_links"  # noqa: S608
                " WHERE token_hash = ?", (key,)).fetchone()
            if row is None:
                return None
            if db.execute("DELETE FROM web_links WHERE token_hash = ?", (key,)).rowcount != 1:
                return None
        return _login(*row[:4]) if row[4] > now else None

    # -- ends and pruning ---------------------------------------------------

    def web_prune(self, now: float, idle: float, limit: int) -> int:
        """Delete up to `limit` expired sessions (absolute expiry passed, or unused
        for `idle` seconds) and up to `limit` expired links; how many went."""
        with self._tx(notify=False) as db:
            gone = db.execute(
                "DELETE FROM web_sessions WHERE id_hash IN (SELECT id_hash FROM web_sessions"
                " WHERE expires <= ? OR used < ? LIMIT ?)", (now, now - idle, limit)).rowcount
            gone += db.execute(
                "DELETE FROM web_links WHERE token_hash IN (SELECT token_hash FROM web_links"
                " WHERE expires <= ? LIMIT ?)", (now, limit)).rowcount
        return int(gone)


def end_web_sessions(db: Database, user: str) -> None:
    """Within a transaction that removes `user` or changes its password: end its
    web sessions and unspent links on every hub."""
    db.execute("DELETE FROM web_sessions WHERE lower(user_name) = lower(?)", (user,))
    db.execute("DELETE FROM web_links WHERE lower(user_name) = lower(?)", (user,))
