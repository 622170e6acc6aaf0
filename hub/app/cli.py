"""The admin CLI, `callhomehub [--data DIR] COMMAND`.

Works on the registry file directly; a running hub notices the change within
two seconds. Every listing also prints as JSON with `--json`. Errors are one
line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from hub import __version__
from hub.app import ca, certs, fleet, hostcert, pairs, sessions, users
from hub.app.config import check_registry_url
from hub.app.stdio import actor, print_table, read_stdin_secret
from hub.errors import HubError
from hub.rules.display import iso_utc, sha256_fingerprint
from hub.store.registry import NETCONF, Node, Registry

# The commands import Conch, bcrypt and the control client when they need them:
# `revoke` and `user del` take effect on the running hub about as fast as this
# process starts, and those imports tripled its start-up time.


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
        "hub": node.hub if node.online else None,
    }


def _forwards_cell(node: Node) -> str:
    """`ssh=49152,http=49153`; a lease with no live forward says so: `ssh=49152 (lease)`."""
    return ",".join(f"{s}={p}" + ("" if s in node.live else " (lease)")
                    for s, p in node.forwards.items()) or "-"


def cmd_callhome_password(reg: Registry, args: argparse.Namespace) -> int:
    password = read_stdin_secret("Call Home Password")
    if not password:
        raise HubError("callhome-password: empty password on stdin")
    from hub.access.auth import CALLHOME_PASSWORD, hash_password

    reg.set_setting(CALLHOME_PASSWORD, hash_password(password), actor())
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
    # Several hubs on one registry: which one holds each online node.
    hubs = any(n.online and n.hub for n in nodes)
    rows[0] += ["HUB"] if hubs else []
    for i, n in enumerate(nodes, 1):
        forwards = _forwards_cell(n)
        pair = member.get(n.name.lower())
        rows.append([str(i), n.name, n.kind, n.state, "online" if n.online else "offline",
                     n.fingerprint, forwards, "on" if n.public else "off", _when(n.last_seen),
                     n.peer or "-", f"{pair['name']} ({pair['role']})" if pair else "-"]
                    + ([(n.hub if n.online else None) or "-"] if hubs else []))
    print_table(rows)
    return 0


def cmd_state(state: str) -> Any:
    def run(reg: Registry, args: argparse.Namespace) -> int:
        if getattr(args, "user", None):
            reg.set_device_access(args.node, actor(), device_user=args.user)
        node = reg.set_state(args.node, state, actor())
        print(f"node {node.name}: {state}")
        if state == "approved" and node.kind == NETCONF:
            # The host key was recorded (after the device proved it) when it called
            # home; approving pins it. The hub logs in on the device's next call home.
            fp = node.fingerprint
            print(f"host key {fp} pinned; the hub logs in as {node.device_user} with its "
                  "management key when the device calls home next")
        elif state == "approved":
            from hub.app.control import ask

            answer = ask(args.data, {"op": "verify", "node": node.name, "actor": actor()})
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
    password = read_stdin_secret(f"password of {args.user} on {node.name}")
    if not password:
        raise HubError("enroll: empty device password on stdin")
    from hub.app.control import ask

    answer = ask(args.data, {"op": "enroll", "node": node.name, "user": args.user,
                             "password": password.decode("utf-8", "replace"),
                             "actor": actor(), "login": getattr(args, "login", "key")})
    if answer is None:
        raise HubError("enroll: the hub is not running (it logs in through the node's tunnel)")
    if not answer["ok"]:
        raise HubError(f"enroll {node.name}: {answer['message']}")
    print(f"node {node.name}: {answer['message']}")
    return 0


def cmd_console(reg: Registry, args: argparse.Namespace) -> int:
    node = reg.set_device_access(args.node, actor(), console=args.template,
                                 clear_console=args.template is None)
    print(f"node {node.name}: console " + (f"template {node.console!r}" if node.console
                                           else f"ports as {node.device_user}:PORT logins"))
    return 0


def cmd_remove(reg: Registry, args: argparse.Namespace) -> int:
    reg.remove(args.node, actor())
    print(f"node {args.node} removed")
    return 0


def cmd_access(reg: Registry, args: argparse.Namespace) -> int:
    if reg.pair(args.node) is not None:  # a pair's own ports
        pair = reg.set_pair_public(args.node, args.mode == "on", actor())
        print(f"pair {pair.name}: public access {args.mode}")
        return 0
    node = reg.set_public(args.node, args.mode == "on", actor())
    print(f"node {node.name}: public access {args.mode}")
    return 0


def cmd_mgmt_key(reg: Registry, args: argparse.Namespace) -> int:
    from hub.ssh.keys import load_hub_keys

    print(load_hub_keys(os.path.join(args.data, "keys")).mgmt_public_line, end="")
    return 0


def cmd_audit(reg: Registry, args: argparse.Namespace) -> int:
    entries = reg.audit_log(args.limit)
    if args.json:
        print(json.dumps([{"time": iso_utc(e.time), "actor": e.actor, "action": e.action,
                           "target": e.target, "detail": e.detail} for e in entries], indent=2))
        return 0
    rows = [["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"]]
    rows += [[_when(e.time), e.actor, e.action, e.target, e.detail] for e in entries]
    print_table(rows)
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
    print_table(rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="callhomehub", description="callhomehub admin CLI")
    p.add_argument("--version", action="version", version=f"callhomehub {__version__}")
    p.add_argument("--data", default=None,
                   help="state directory of the hub (default $CALLHOMEHUB_DATA, else .)")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="a PostgreSQL registry, postgresql://USER@HOST/DATABASE "
                        "(default $CALLHOMEHUB_REGISTRY, else DATA/hub.sqlite3)")
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
    users.add_parser(sub, add)
    add("status", cmd_status, "monitoring: latest result per host/service",
        listing=True).add_argument("node", nargs="?")
    add("audit", cmd_audit, "show the audit log", listing=True).add_argument(
        "--limit", type=int, default=1000)
    fleet.add_parser(sub, actor)
    certs.add_parser(sub, actor)
    ca.add_parser(sub, actor)
    hostcert.add_parser(sub, actor)
    sessions.add_parser(sub, actor)
    pairs.add_parser(sub, actor)
    return p


# What a first set-up does before the hub ever ran: these may create the registry.
SETUP = (cmd_callhome_password, users.cmd_user_add)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = args.data or os.environ.get("CALLHOMEHUB_DATA") or "."
    url = args.registry or os.environ.get("CALLHOMEHUB_REGISTRY")
    path = url or os.path.join(args.data, "hub.sqlite3")
    try:
        if url is not None:
            check_registry_url(url)
        elif args.func not in SETUP and not os.path.exists(path):
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
