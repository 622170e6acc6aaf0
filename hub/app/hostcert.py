"""`callhomehub host-cert [--ca CA_PRIVATE_KEY] [--principals H1,H2] [--validity DAYS]`.

With `--ca`, signs the hub's ed25519 host key with the organisation's host CA
(as `ssh-keygen -s CA -h` would) into `DATA/keys/ssh_host_ed25519_key-cert.pub`;
without it, says whether the certificate there (made here or placed there after
signing elsewhere) is one the hub presents. The hub reads it at start.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from hub.errors import HubError
from hub.ssh.hostcerts import host_cert_path, load_host_certificate, sign_host_certificate
from hub.ssh.keys import load_hub_keys
from hub.store.registry import Registry


def add_parser(sub: Any, actor: Callable[[], str]) -> None:
    sp = sub.add_parser("host-cert", help="sign the hub's host key with a host CA, or show "
                        "the host certificate the hub presents")
    sp.set_defaults(func=lambda reg, args: cmd_host_cert(reg, args, actor()))
    sp.add_argument("--ca", metavar="CA_PRIVATE_KEY_FILE",
                    help="the host CA's private key (no passphrase; else sign with "
                         "ssh-keygen -s CA -h and place the certificate)")
    sp.add_argument("--principals", metavar="HOST1,HOST2",
                    help="host names the certificate is for (default: this host's name)")
    sp.add_argument("--validity", type=float, default=365.0, metavar="DAYS",
                    help="days from now the certificate is valid (default 365)")
    sp.add_argument("--key-id", help="the certificate's key ID (default callhomehub:HOST)")


def cmd_host_cert(reg: Registry, args: argparse.Namespace, actor: str) -> int:
    keys_dir = os.path.join(args.data, "keys")
    host_key = load_hub_keys(keys_dir).host_private[b"ssh-ed25519"]
    path = host_cert_path(keys_dir)
    if args.ca is not None:
        if not args.validity > 0:
            raise HubError("host-cert: --validity must be more than 0 days")
        principals = [p.strip() for p in (args.principals or socket.getfqdn()).split(",")
                      if p.strip()]
        try:
            with open(args.ca, "rb") as f:
                ca_text = f.read(64 * 1024)
        except OSError as e:
            raise HubError(f"host-cert: cannot read {args.ca}: {e.strerror}") from None
        line = sign_host_certificate(ca_text, host_key, principals,
                                     args.key_id or f"callhomehub:{principals[0]}",
                                     args.validity, time.time())
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(line)
        os.replace(tmp, path)
    certificate = load_host_certificate(keys_dir, host_key, time.time())
    if certificate is None:
        print(f"no host certificate ({path}): the hub presents its plain host keys")
        return 0
    if args.ca is not None:
        reg.audit(actor, "host-cert", "hub", certificate.describe())
        print(f"host certificate written to {path}; restart the hub to present it")
    print(f"host certificate: {certificate.describe()}")
    return 0
