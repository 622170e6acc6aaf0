"""The admin CLI, `callhomehub [--data DIR] COMMAND`.

Works on the registry file directly; a running hub notices the change within
two seconds. Every listing also prints as JSON with `--json`. Errors are one
line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import pwd
import sys
import time
from collections.abc import Sequence
from typing import Any

from hub import __version__
from hub.app import ca, certs, fleet, hostcert, pairs, sessions
from hub.errors import HubError
from hub.rules.display import iso_utc, sha256_fingerprint
from hub.rules.names import is_valid_name
from hub.store.registry import NETCONF, Node, Registry

# The commands import Conch, bcrypt and the control client when they need them:
# `revoke` and `user del` take effect on the running hub about as fast as this
# process starts, and those imports tripled its start-up time.


def _actor() -> str:
    try:
        return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"cli:uid{os.getuid()}"


def _when(t: float | None) -> str:
    return iso_utc(t) or "-"


def _node_json(node: Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "kind": node.kind,
        "state": node.state,
        "online": node.online,
        "fingerprint": node.fingerprint,
        "forwards": {s: p for s, p in node.forwards.items() if s in node.live},
        "public": node.public,
        "last_seen": iso_utc(node.last_seen),
        "online_since": iso_utc(node.online_since),
        "peer": node.peer,
        "device_user": node.device_user,
        "leases": node.forwards,
        "host_key": sha256_fingerprint(node.host_key),
    }


def _forwards_cell(node: Node) -> str:
    """`ssh=49152,http=49153`; a lease with no live forward says so: `ssh=49152 (lease)`."""
    return ",".join(f"{s}={p}" + ("" if s in node.live else " (lease)")
                    for s, p in node.forwards.items()) or "-"


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _read_stdin_secret(what: str) -> bytes:
    if sys.stdin.isatty():
        return getpass.getpass(f"{what}: ").encode()
    value = sys.stdin.buffer.read().rstrip(b"\r\n")
    return value


def cmd_callhome_password(reg: Registry, args: argparse.Namespace) -> int:
    password = _read_stdin_secret("Call Home Password")
    if not password:
        raise HubError("callhome-password: empty password on stdin")
    from hub.access.auth import CALLHOME_PASSWORD, hash_password

    reg.set_setting(CALLHOME_PASSWORD, hash_password(password), _actor())
    print("Call Home Password set")
    return 0


def cmd_nodes(reg: Registry, args: argparse.Namespace) -> int:
    nodes = reg.nodes()
    member = pairs.membership(reg)
    if args.json:
        print(json.dumps([{**_node_json(n), "pair": member.get(n.name.lower())}
                          for n in nodes], indent=2))
        return 0
    rows = [["#", "NAME", "KIND", "STATE", "ONLINE", "FINGERPRINT", "FORWARDS", "PUBLIC",
             "LAST SEEN", "PEER", "PAIR"]]
    for i, n in enumerate(nodes, 1):
        forwards = _forwards_cell(n)
        pair = member.get(n.name.lower())
        rows.append([str(i), n.name, n.kind, n.state, "online" if n.online else "offline",
                     n.fingerprint, forwards, "on" if n.public else "off", _when(n.last_seen),
                     n.peer or "-", f"{pair['name']} ({pair['role']})" if pair else "-"])
    _print_table(rows)
    return 0


def cmd_state(state: str) -> Any:
    def run(reg: Registry, args: argparse.Namespace) -> int:
        if getattr(args, "user", None):
            reg.set_device_access(args.node, _actor(), device_user=args.user)
        node = reg.set_state(args.node, state, _actor())
        print(f"node {node.name}: {state}")
        if state == "approved" and node.kind == NETCONF:
            # The host key was recorded (after the device proved it) when it called
            # home; approving pins it. The hub logs in on the device's next call home.
            fp = node.fingerprint
            print(f"host key {fp} pinned; the hub logs in as {node.device_user} with its "
                  "management key when the device calls home next")
        elif state == "approved":
            from hub.app.control import ask

            answer = ask(args.data, {"op": "verify", "node": node.name, "actor": _actor()})
            if answer is None:
                print("the hub is not running: the device login is verified on its next "
                      "`callhomehub approve` or `enroll`")
            elif answer["ok"]:
                print(answer["message"])
            else:
                print(f"warning: {answer['message']}", file=sys.stderr)
        return 0
    return run


def cmd_enroll(reg: Registry, args: argparse.Namespace) -> int:
    node = reg.node(args.node)
    if node.kind == NETCONF:
        raise HubError(f"enroll {node.name}: not supported for NETCONF nodes; authorize the "
                       "management key (callhomehub mgmt-key) on the device and run "
                       f"callhomehub approve {node.name} [--user USER]")
    password = _read_stdin_secret(f"password of {args.user} on {node.name}")
    if not password:
        raise HubError("enroll: empty device password on stdin")
    from hub.app.control import ask

    answer = ask(args.data, {"op": "enroll", "node": node.name, "user": args.user,
                             "password": password.decode("utf-8", "replace"),
                             "actor": _actor(), "login": getattr(args, "login", "key")})
    if answer is None:
        raise HubError("enroll: the hub is not running (it logs in through the node's tunnel)")
    if not answer["ok"]:
        raise HubError(f"enroll {node.name}: {answer['message']}")
    print(f"node {node.name}: {answer['message']}")
    return 0


def cmd_console(reg: Registry, args: argparse.Namespace) -> int:
    node = reg.set_device_access(args.node, _actor(), console=args.template,
                                 clear_console=args.template is None)
    print(f"node {node.name}: console " + (f"template {node.console!r}" if node.console
                                           else f"ports as {node.device_user}:PORT logins"))
    return 0


def cmd_remove(reg: Registry, args: argparse.Namespace) -> int:
    reg.remove(args.node, _actor())
    print(f"node {args.node} removed")
    return 0


def cmd_access(reg: Registry, args: argparse.Namespace) -> int:
    if reg.pair(args.node) is not None:  # a pair's own ports
        pair = reg.set_pair_public(args.node, args.mode == "on", _actor())
        print(f"pair {pair.name}: public access {args.mode}")
        return 0
    node = reg.set_public(args.node, args.mode == "on", _actor())
    print(f"node {node.name}: public access {args.mode}")
    return 0


def cmd_mgmt_key(reg: Registry, args: argparse.Namespace) -> int:
    from hub.ssh.keys import load_hub_keys

    print(load_hub_keys(os.path.join(args.data, "keys")).mgmt_public_line, end="")
    return 0


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
    user = reg.add_user(args.name, password_hash, keys, args.allow or [], _actor(),
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
    password = _read_stdin_secret("password")
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
    user = reg.set_user(args.name, _actor(), **change)
    print(f"user {user.name} changed ({len(user.keys)} key(s), "
          f"password {'set' if user.password_hash else 'none'}, "
          f"allow {' '.join(user.allow) or '-'}{', admin' if user.admin else ''})")
    return 0


def cmd_user_del(reg: Registry, args: argparse.Namespace) -> int:
    reg.del_user(args.name, _actor())
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
    _print_table(rows)
    return 0


def cmd_audit(reg: Registry, args: argparse.Namespace) -> int:
    entries = reg.audit_log(args.limit)
    if args.json:
        print(json.dumps([{"time": iso_utc(e.time), "actor": e.actor, "action": e.action,
                           "target": e.target, "detail": e.detail} for e in entries], indent=2))
        return 0
    rows = [["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"]]
    rows += [[_when(e.time), e.actor, e.action, e.target, e.detail] for e in entries]
    _print_table(rows)
    return 0


def cmd_status(reg: Registry, args: argparse.Namespace) -> int:
    from hub.intake.monitoring import status

    if args.node is not None:
        reg.node(args.node)  # an unknown node is an error, not an empty table
    results = status(reg, args.node)
    if args.json:
        print(json.dumps([{"node": r.node, "host": r.host, "service": r.service,
                           "code": r.code, "output": r.output, "time": iso_utc(r.time)}
                          for r in results], indent=2))
        return 0
    states = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
    rows = [["NODE", "HOST", "SERVICE", "STATE", "TIME", "OUTPUT"]]
    rows += [[r.node or "-", r.host, r.service or "(host)", states.get(r.code, str(r.code)),
              _when(r.time), r.output.splitlines()[0] if r.output else ""] for r in results]
    _print_table(rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="callhomehub", description="callhomehub admin CLI")
    p.add_argument("--version", action="version", version=f"callhomehub {__version__}")
    p.add_argument("--data", default=None,
                   help="state directory of the hub (default $CALLHOMEHUB_DATA, else .)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help: str, listing: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(func=func)
        if listing:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    add("callhome-password", cmd_callhome_password, "set the Call Home Password (stdin)")
    add("nodes", cmd_nodes, "list nodes", listing=True)
    for name, state in (("approve", "approved"), ("revoke", "revoked")):
        add(name, cmd_state(state), f"{name} a node").add_argument("node")
    approve = sub.choices["approve"]
    approve.add_argument("--user", help="device user the hub logs in as (default: unchanged, "
                         "root for a new node)")
    add("remove", cmd_remove, "remove a node").add_argument("node")
    sp = add("enroll", cmd_enroll, "install the management key on a node (password on stdin)")
    sp.add_argument("node")
    sp.add_argument("--user", default="root", help="device user (default root)")
    sp = add("console-template", cmd_console,
             "command run on the device for NODE:PORT logins ({port} is replaced)")
    sp.add_argument("node")
    sp.add_argument("template", nargs="?", help="omit to use DEVICEUSER:PORT logins")
    sp = add("access", cmd_access, "public access to a node's ports on or off")
    sp.add_argument("node")
    sp.add_argument("mode", choices=["on", "off"])
    add("mgmt-key", cmd_mgmt_key, "print the hub's management public key")
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
    add("status", cmd_status, "monitoring: latest result per host/service",
        listing=True).add_argument("node", nargs="?")
    add("audit", cmd_audit, "show the audit log", listing=True).add_argument(
        "--limit", type=int, default=1000)
    fleet.add_parser(sub, _actor)
    certs.add_parser(sub, _actor)
    ca.add_parser(sub, _actor)
    hostcert.add_parser(sub, _actor)
    sessions.add_parser(sub, _actor)
    pairs.add_parser(sub, _actor)
    return p


# What a first set-up does before the hub ever ran: these may create the registry.
SETUP = (cmd_callhome_password, cmd_user_add)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = args.data or os.environ.get("CALLHOMEHUB_DATA") or "."
    path = os.path.join(args.data, "hub.sqlite3")
    try:
        if args.func not in SETUP and not os.path.exists(path):
            # Not a new empty hub: a mistyped --data or the wrong directory.
            raise HubError(f"no hub registry in {os.path.abspath(args.data)}: start the hub "
                           "there first, or pass --data (or set CALLHOMEHUB_DATA)")
        os.makedirs(args.data, exist_ok=True)
        registry = Registry(path, now=time.time)
        try:
            return int(args.func(registry, args))
        finally:
            registry.close()
    except (HubError, OSError) as e:
        print(f"callhomehub: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
