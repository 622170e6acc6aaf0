"""`callhomehub ca init [--force]` and `callhomehub ca pubkey`: the hub's user CA.

With `[devices] login = "ca"` in the config file the hub logs in to devices with
a short-lived certificate from this CA (hub.ssh.usercerts); a device trusts it
with the line `ca pubkey` prints (sshd's TrustedUserCAKeys, or authorized_keys
with `cert-authority`, which `enroll NODE --login ca` installs).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from hub.errors import HubError
from hub.ssh.keys import fingerprint
from hub.ssh.usercerts import (
    authorized_keys_line,
    ca_public_line,
    create_user_ca,
    load_user_ca,
    user_ca_path,
)
from hub.store.registry import Registry


def add_parser(sub: Any, actor: Callable[[], str]) -> None:
    sp = sub.add_parser("ca", help="the hub's user CA for logins to devices: init, pubkey")
    csub = sp.add_subparsers(dest="ca_command", required=True)
    init = csub.add_parser("init", help="create the hub user CA key")
    init.set_defaults(func=lambda reg, args: cmd_init(reg, args, actor()))
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA (devices trusting the old one refuse the hub)")
    pubkey = csub.add_parser("pubkey", help="print the CA public key line for the devices' "
                             "TrustedUserCAKeys")
    pubkey.set_defaults(func=cmd_pubkey)
    pubkey.add_argument("--user", help="print it as an authorized_keys line for this device "
                        "user (cert-authority,principals=\"USER\" ...)")
    sub.choices["enroll"].add_argument(
        "--login", choices=["key", "ca"], default="key",
        help="install the management key (default) or trust the hub user CA "
             "(needs [devices] login = \"ca\")")


def _keys_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.data, "keys")


def cmd_init(reg: Registry, args: argparse.Namespace, actor: str) -> int:
    existed = load_user_ca(_keys_dir(args)) is not None
    ca = create_user_ca(_keys_dir(args), force=args.force)
    stamp = fingerprint(ca.public().blob())
    reg.audit(actor, "ca init", "hub", f"user CA {stamp}" + (" (replaced)" if existed else ""))
    print(f"hub user CA {stamp} {'replaced' if existed else 'created'} in "
          f"{user_ca_path(_keys_dir(args))}")
    print("devices trust it with this line (callhomehub ca pubkey):")
    print(ca_public_line(ca))
    return 0


def cmd_pubkey(reg: Registry, args: argparse.Namespace) -> int:
    ca = load_user_ca(_keys_dir(args))
    if ca is None:
        raise HubError("the hub has no user CA; run: callhomehub ca init")
    print(authorized_keys_line(ca, args.user) if args.user else ca_public_line(ca))
    return 0
