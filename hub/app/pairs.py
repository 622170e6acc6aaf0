"""`callhomehub pair add NAME MASTER CLONE`, `pair del NAME`, `pairs [--json]`.

A pair's name reaches its master while the master is online, else its clone
(`hub.rules.pairs`); the running hub notices a pair added or deleted within
two seconds, like every registry change. `nodes` shows each node's pair.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from hub.app.stdio import print_table
from hub.rules.pairs import Pair, active_member
from hub.rules.routes import Refusal
from hub.store.registry import Node, Registry


def add_parser(sub: Any, actor: Callable[[], str]) -> None:
    sp = sub.add_parser("pair", help="master/clone pairs: add, delete")
    psub = sp.add_subparsers(dest="pair_command", required=True)
    add = psub.add_parser("add", help="NAME reaches MASTER while it is online, else CLONE")
    add.set_defaults(func=lambda reg, args: cmd_add(reg, args, actor()))
    for name in ("name", "master", "clone"):
        add.add_argument(name)
    delete = psub.add_parser("del", help="delete a pair (its members stay)")
    delete.set_defaults(func=lambda reg, args: cmd_del(reg, args, actor()))
    delete.add_argument("name")
    listing = sub.add_parser("pairs", help="list master/clone pairs")
    listing.set_defaults(func=cmd_pairs)
    listing.add_argument("--json", action="store_true", help="print JSON")


def cmd_add(reg: Registry, args: argparse.Namespace, actor: str) -> int:
    pair = reg.add_pair(args.name, args.master, args.clone, actor)
    print(f"pair {pair.name}: master {pair.master}, clone {pair.clone}")
    return 0


def cmd_del(reg: Registry, args: argparse.Namespace, actor: str) -> int:
    reg.del_pair(args.name, actor)
    print(f"pair {args.name} deleted")
    return 0


def active(pair: Pair, nodes: dict[str, Node]) -> str | None:
    """The member the hub reaches now, as the registry records it: approved and
    online with a live forward (its tunnel up)."""
    def online(name: str) -> bool:
        node = nodes.get(name.lower())
        return node is not None and node.state == "approved" and node.online and bool(node.live)

    found = active_member(pair, online(pair.master), online(pair.clone))
    return None if isinstance(found, Refusal) else found


def pair_json(pair: Pair, nodes: dict[str, Node]) -> dict[str, Any]:
    return {"name": pair.name, "master": pair.master, "clone": pair.clone,
            "active": active(pair, nodes), "public": pair.public,
            "forwards": {s: p for s, p in pair.forwards.items() if s in pair.live},
            "leases": pair.forwards}


def cmd_pairs(reg: Registry, args: argparse.Namespace) -> int:
    nodes = {n.name.lower(): n for n in reg.nodes()}
    pairs = reg.pairs()
    if args.json:
        print(json.dumps([pair_json(p, nodes) for p in pairs], indent=2))
        return 0
    rows = [["NAME", "MASTER", "CLONE", "ACTIVE", "PORTS", "PUBLIC"]]
    for p in pairs:
        ports = ",".join(f"{s}={port}" + ("" if s in p.live else " (lease)")
                         for s, port in p.forwards.items()) or "-"
        rows.append([p.name, p.master, p.clone, active(p, nodes) or "none (offline)", ports,
                     "on" if p.public else "off"])
    print_table(rows)
    return 0


def membership(reg: Registry) -> dict[str, dict[str, str]]:
    """Each member node's pair (`name`, `role`), by lower-cased node name (for `nodes`)."""
    return {m.lower(): {"name": p.name, "role": p.role(m) or ""}
            for p in reg.pairs() for m in p.members}
