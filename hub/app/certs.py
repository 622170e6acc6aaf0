"""`callhomehub cert revoke --serial N | --key-id ID` and `callhomehub cert revoked`.

The hub refuses operator certificates on this list at their next login (as sshd's
`RevokedKeys`); the trusted user CAs themselves are `[operators] trusted_ca_keys`
in the config file.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from hub.store.registry import Registry


def add_parser(sub: Any, actor: Callable[[], str]) -> None:
    sp = sub.add_parser("cert", help="operator certificates: revoke, list revoked")
    csub = sp.add_subparsers(dest="cert_command", required=True)
    revoke = csub.add_parser("revoke", help="refuse a certificate by serial or key ID")
    revoke.set_defaults(func=lambda reg, args: cmd_revoke(reg, args, actor()))
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=int, help="the certificate's serial (ssh-keygen -z)")
    which.add_argument("--key-id", help="the certificate's key ID (ssh-keygen -I)")
    listing = csub.add_parser("revoked", help="list revoked serials and key IDs")
    listing.set_defaults(func=cmd_revoked)
    listing.add_argument("--json", action="store_true", help="print JSON")


def cmd_revoke(reg: Registry, args: argparse.Namespace, actor: str) -> int:
    what = f"serial {args.serial}" if args.serial is not None else f"key ID {args.key_id!r}"
    if reg.revoke_certificate(actor, serial=args.serial, key_id=args.key_id):
        print(f"certificate {what} revoked: refused at its next login")
    else:
        print(f"certificate {what} was already revoked")
    return 0


def cmd_revoked(reg: Registry, args: argparse.Namespace) -> int:
    rows = reg.revoked_certificates()
    if args.json:
        print(json.dumps([{"serial": serial, "key_id": key_id, "time": when, "actor": who}
                          for serial, key_id, when, who in rows], indent=2))
        return 0
    print("SERIAL  KEY ID  REVOKED  BY")
    for serial, key_id, when, who in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
        print(f"{'-' if serial is None else serial}  {key_id or '-'}  {stamp}  {who}")
    return 0
