"""`callhomehub user add|set|del` and `callhomehub users`: the operators."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from hub.app.stdio import actor, print_table, read_stdin_secret
from hub.errors import HubError
from hub.rules.names import is_valid_name
from hub.store.registry import Registry


def add_parser(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("user", lambda reg, args: 2, "manage operators")
    usub = sp.add_subparsers(dest="user_command", required=True)
    ua = usub.add_parser("add", help="add an operator")
    ua.set_defaults(func=cmd_user_add)
    ua.add_argument("name")
    ua.add_argument("--key", action="append", metavar="FILE", help="public key file")
    ua.add_argument("--password-stdin", action="store_true", help="read a password from stdin")
    ua.add_argument("--allow", nargs="+", action="extend", metavar="GLOB",
                    help="node name patterns the user may reach")
    ua.add_argument("--cert-only", action="store_true", help="no key and no password: the "
                    "operator logs in with a certificate from a trusted user CA only")
    ua.add_argument("--admin", action="store_true",
                    help="may approve, revoke, remove and switch access in the web console")
    us = usub.add_parser("set", help="change an operator: what is given replaces what was "
                         "there; live sessions are re-checked")
    us.set_defaults(func=cmd_user_set)
    us.add_argument("name")
    us.add_argument("--key", action="append", metavar="FILE",
                    help="public key file (the keys given replace the user's keys)")
    us.add_argument("--password-stdin", action="store_true", help="read a new password from stdin")
    us.add_argument("--no-password", action="store_true", help="remove the password")
    us.add_argument("--allow", nargs="+", action="extend", metavar="GLOB",
                    help="node name patterns the user may reach (replace the grants)")
    us.add_argument("--no-allow", action="store_true", help="remove every grant")
    us.add_argument("--cert-only", action="store_true", help="remove the keys and the "
                    "password: certificate logins only")
    us.add_argument("--admin", action="store_true", help="make the operator an admin")
    us.add_argument("--no-admin", action="store_true", help="take the admin mark away")
    ud = usub.add_parser("del", help="delete an operator")
    ud.set_defaults(func=cmd_user_del)
    ud.add_argument("name")
    add("users", cmd_users, "list operators", listing=True)


def cmd_user_add(reg: Registry, args: argparse.Namespace) -> int:
    if not is_valid_name(args.name) or args.name.lower() == "cms":
        raise HubError(f"user add: invalid user name {args.name!r}")
    keys = _read_keys("user add", args.key or [])
    password_hash = None
    if args.password_stdin:
        password_hash = _read_password("user add")
    if args.cert_only and (keys or password_hash is not None):
        raise HubError("user add: --cert-only takes no --key or --password-stdin")
    if not keys and password_hash is None and not args.cert_only:
        raise HubError("user add: give --key FILE and/or --password-stdin (or --cert-only "
                       "for an operator who logs in with a certificate only)")
    user = reg.add_user(args.name, password_hash, keys, args.allow or [], actor(),
                        admin=args.admin)
    print(f"user {user.name} added ({len(user.keys)} key(s), "
          f"password {'set' if password_hash else 'none'}, allow {' '.join(user.allow) or '-'}"
          f"{', admin' if user.admin else ''})"
          + ("; certificate logins only" if args.cert_only else ""))
    return 0


def _read_keys(command: str, paths: list[str]) -> list[tuple[bytes, str]]:
    from hub.ssh.keys import parse_public_key

    keys = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                key = parse_public_key(f.read())
        except OSError as e:
            raise HubError(f"{command}: --key {path}: {e.strerror}") from None
        keys.append((key.blob, key.fingerprint))
    return keys


def _read_password(command: str) -> str:
    password = read_stdin_secret("password")
    if not password:
        raise HubError(f"{command}: empty password on stdin")
    from hub.access.auth import hash_password

    return hash_password(password)


def cmd_user_set(reg: Registry, args: argparse.Namespace) -> int:
    """Replace what is given; the running hub re-checks the operator's live sessions."""
    if args.password_stdin and args.no_password:
        raise HubError("user set: give --password-stdin or --no-password, not both")
    if args.admin and args.no_admin:
        raise HubError("user set: give --admin or --no-admin, not both")
    if not (args.key or args.allow or args.no_allow or args.password_stdin
            or args.no_password or args.cert_only or args.admin or args.no_admin):
        raise HubError("user set: nothing to change (--key, --allow, --no-allow, "
                       "--password-stdin, --no-password, --cert-only, --admin, --no-admin)")
    if args.cert_only and (args.key or args.password_stdin):
        raise HubError("user set: --cert-only takes no --key or --password-stdin")
    if args.allow and args.no_allow:
        raise HubError("user set: give --allow or --no-allow, not both")
    change: dict[str, Any] = {}
    if args.key:
        change["keys"] = _read_keys("user set", args.key)
    if args.allow or args.no_allow:
        change["allow"] = args.allow or []
    if args.password_stdin:
        change["password_hash"] = _read_password("user set")
    elif args.no_password:
        change["password_hash"] = None
    if args.cert_only:
        change.update(keys=[], password_hash=None, cert_only=True)
    if args.admin or args.no_admin:
        change["admin"] = bool(args.admin)
    user = reg.set_user(args.name, actor(), **change)
    print(f"user {user.name} changed ({len(user.keys)} key(s), "
          f"password {'set' if user.password_hash else 'none'}, "
          f"allow {' '.join(user.allow) or '-'}{', admin' if user.admin else ''})")
    return 0


def cmd_user_del(reg: Registry, args: argparse.Namespace) -> int:
    reg.del_user(args.name, actor())
    print(f"user {args.name} deleted")
    return 0


def cmd_users(reg: Registry, args: argparse.Namespace) -> int:
    users = reg.users()
    if args.json:
        print(json.dumps([{"name": u.name, "password": u.password_hash is not None,
                           "keys": list(u.fingerprints), "allow": list(u.allow),
                           "admin": u.admin}
                          for u in users], indent=2))
        return 0
    rows = [["NAME", "PASSWORD", "KEYS", "ALLOW", "ADMIN"]]
    for u in users:
        rows.append([u.name, "yes" if u.password_hash else "no",
                     ",".join(u.fingerprints) or "-", " ".join(u.allow) or "-",
                     "yes" if u.admin else "no"])
    print_table(rows)
    return 0
