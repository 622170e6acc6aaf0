"""What the admin CLI's commands share for their input and output: who is acting
(for the audit), tables, and a secret read from stdin."""

from __future__ import annotations

import getpass
import os
import pwd
import sys

from hub.errors import HubError


def actor() -> str:
    """`cli:USER`, the audit's actor for a command run on the hub's machine."""
    try:
        return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"cli:uid{os.getuid()}"


def print_table(rows: list[list[str]]) -> None:
    """Rows (the first is the header) in columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def read_stdin_secret(what: str) -> bytes:
    """A password from the terminal (not echoed) or piped in: one line, the line ends after it
    not part of it. Piped text of more than one line is refused, not stored with a line break
    inside that nobody could type at a password prompt."""
    if sys.stdin.isatty():
        return getpass.getpass(f"{what}: ").encode()
    text = sys.stdin.buffer.read()
    secret = text.rstrip(b"\r\n")
    if b"\n" in secret or b"\r" in secret:
        lines = len(secret.splitlines())
        raise HubError(f"the {what} on stdin is {lines} lines; give it alone on one line")
    return secret
