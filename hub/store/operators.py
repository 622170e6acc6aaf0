"""The operators part of the registry: users, their keys, their grants.

Mixed into `hub.store.registry.Registry`, whose transaction (`_tx`) and audit
(`_audit`) it uses; split out only to keep each file about one thing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from hub.errors import NameTaken, NotFound, RegistryError
from hub.store.engine import Database
from hub.store.rows import User
from hub.store.websessions import end_web_sessions


class Keep:
    """`set_user`'s marker for a password left as it is (None removes it)."""


KEEP = Keep()


class OperatorRecords:
    """Operator rows; every method is one transaction of the registry."""

    _db: Database
    _now: Callable[[], float]
    _tx: Callable[[], AbstractContextManager[Database]]
    _audit: Callable[..., None]

    def add_user(self, name: str, password_hash: str | None, keys: list[tuple[bytes, str]],
                 allow: list[str], actor: str, admin: bool = False) -> User:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise NameTaken(f"user {name!r} already exists")
            uid = self._new_user_id(db)
            db.execute(
                "INSERT INTO users (id, name, password_hash, created, admin)"
                " VALUES (?, ?, ?, ?, ?)", (uid, name, password_hash, self._now(), int(admin)),
            )
            db.executemany(
                "INSERT INTO user_keys (user_id, key_blob, fingerprint) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [(uid, blob, fp) for blob, fp in keys],
            )
            db.executemany(
                "INSERT INTO grants (user_id, pattern) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(uid, pattern) for pattern in allow],
            )
            self._audit(db, actor, "user-add", name,
                        " ".join(allow) + (" admin" if admin else ""))
        return self.user(name)

    @staticmethod
    def _new_user_id(db: Database) -> int:
        # Never an id a deleted user had (SQLite reuses the highest rowid): a live
        # connection of a deleted operator must not pass for one added later.
        last = db.execute("SELECT value FROM settings WHERE key = 'last-user-id'").fetchone()
        (highest,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM users").fetchone()
        uid = max(int(last[0]) if last else 0, int(highest)) + 1
        db.execute("INSERT INTO settings (key, value) VALUES ('last-user-id', ?)"
                   " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(uid),))
        return uid

    def del_user(self, name: str, actor: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no user named {name!r}")
            end_web_sessions(db, name)
            self._audit(db, actor, "user-del", name, "")

    def set_user(self, name: str, actor: str, *, password_hash: str | Keep | None = KEEP,
                 keys: list[tuple[bytes, str]] | None = None,
                 allow: list[str] | None = None, admin: bool | None = None,
                 cert_only: bool = False) -> User:
        """Replace what is given of an operator's password, keys, grants and admin mark
        (`cert_only`: neither key nor password is left, on purpose)."""
        with self._tx() as db:
            row = db.execute("SELECT id, password_hash FROM users WHERE name = ?",
                             (name,)).fetchone()
            if row is None:
                raise NotFound(f"no user named {name!r}")
            uid, old_hash = row
            new_hash = old_hash if isinstance(password_hash, Keep) else password_hash
            has_keys = (bool(keys) if keys is not None else db.execute(
                "SELECT 1 FROM user_keys WHERE user_id = ?", (uid,)).fetchone() is not None)
            if new_hash is None and not has_keys and not cert_only:
                raise RegistryError(f"user {name}: would have neither a key nor a password")
            changed = []
            if not isinstance(password_hash, Keep):
                db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, uid))
                # Set, changed or removed, a password ends every web session of the
                # operator, however it signed in (a change is often after a leak).
                end_web_sessions(db, name)
                changed.append("password " + ("set" if new_hash else "none"))
            if keys is not None:
                db.execute("DELETE FROM user_keys WHERE user_id = ?", (uid,))
                db.executemany(
                    "INSERT INTO user_keys (user_id, key_blob, fingerprint)"
                    " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    [(uid, blob, fp) for blob, fp in keys])
                changed.append(f"keys {' '.join(fp for _, fp in keys)}")
            if allow is not None:
                db.execute("DELETE FROM grants WHERE user_id = ?", (uid,))
                db.executemany("INSERT INTO grants (user_id, pattern) VALUES (?, ?)"
                               " ON CONFLICT DO NOTHING",
                               [(uid, pattern) for pattern in allow])
                changed.append(f"allow {' '.join(allow) or '-'}")
            if admin is not None:
                db.execute("UPDATE users SET admin = ? WHERE id = ?", (int(admin), uid))
                changed.append("admin" if admin else "not admin")
            self._audit(db, actor, "user-set", name, "; ".join(changed))
        return self.user(name)

    def user(self, name: str) -> User:
        row = self._db.execute(
            "SELECT id, name, password_hash, created, admin FROM users WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no user named {name!r}")
        uid, uname, password_hash, created, admin = row
        keys = self._db.execute(
            "SELECT key_blob, fingerprint FROM user_keys WHERE user_id = ? ORDER BY rowid", (uid,)
        ).fetchall()
        allow = self._db.execute(
            "SELECT pattern FROM grants WHERE user_id = ? ORDER BY rowid", (uid,)
        ).fetchall()
        return User(name=uname, password_hash=password_hash, keys=tuple(k for k, _ in keys),
                    fingerprints=tuple(f for _, f in keys), allow=tuple(p for (p,) in allow),
                    identity=(uid, created), admin=bool(admin))

    def users(self) -> list[User]:
        names = self._db.execute("SELECT name FROM users ORDER BY id").fetchall()
        return [self.user(name) for (name,) in names]

    # -- certificates ---------------------------------------------------------

    def revoke_certificate(self, actor: str, *, serial: int | None = None,
                           key_id: str | None = None) -> bool:
        """Refuse certificates with this serial or key ID from now on; False if already."""
        if (serial is None) == (key_id is None):
            raise RegistryError("revoke a certificate by serial or by key ID")
        with self._tx() as db:
            added = db.execute(
                "INSERT INTO revoked_certificates (serial, key_id, time, actor) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (serial, key_id, self._now(), actor)).rowcount
            if added:
                what = f"serial {serial}" if serial is not None else f"key ID {key_id}"
                self._audit(db, actor, "cert-revoke", what, "")
        return bool(added)

    def certificate_revoked(self, serial: int, key_id: str) -> bool:
        return self._db.execute(
            "SELECT 1 FROM revoked_certificates WHERE serial = ? OR key_id = ?",
            (serial, key_id)).fetchone() is not None

    def revoked_certificates(self) -> list[tuple[int | None, str | None, float, str]]:
        """(serial, key ID, time, actor) of every revocation, oldest first."""
        return [tuple(row) for row in self._db.execute(  # type: ignore[misc]
            "SELECT serial, key_id, time, actor FROM revoked_certificates ORDER BY id")]

    # -- audit ------------------------------------------------------------
