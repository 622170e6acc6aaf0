"""One-time sign-in links: `ssh alice@hub weblink` prints one, valid for 60 seconds.

The link carries a 256-bit token bound to the SSH login that asked for it (so it
lapses with that login's key or password); redeeming it spends it. Links live in
the registry (only the token's SHA-256, `hub.store.websessions`): any worker or
hub issues one, any hub with the web console takes it, and only one takes it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from attrs import define
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from hub.rules.logins import OperatorLogin
from hub.store.offthread import RegistryCalls
from hub.store.registry import Registry

LINK_TTL = 60.0


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@define(eq=False)
class WebLinks:
    """Implements `hub.access.needs.WebLinks` for the gateway. The links' rows are
    read and written in the hub's registry thread (`calls`)."""

    calls: RegistryCalls
    clock: IReactorTime
    # The console's base URL (--web-url), else None: built from where the operator
    # reached the hub, with the web port and scheme.
    base_url: str | None
    tls: bool
    port: Callable[[], int | None]
    ttl: float = LINK_TTL

    def issue(self, login: OperatorLogin, arrived_at: str) -> str:
        """A new sign-in URL for `login` (its host: --web-url, else `arrived_at`)."""
        token = secrets.token_urlsafe(32)
        # Queued, not waited for: the operator reads the URL after the registry
        # thread has long written it (a failed write is logged; the link is unknown).
        self.calls.write(Registry.web_link_add, token, login, self.clock.seconds() + self.ttl)
        return f"{self.base(arrived_at)}/signin/{token}"

    def base(self, host: str) -> str:
        if self.base_url is not None:
            return self.base_url
        scheme = "https" if self.tls else "http"
        port = self.port()
        default = 443 if self.tls else 80
        suffix = "" if port in (None, default) else f":{port}"
        return f"{scheme}://{url_host(host)}{suffix}"

    def valid(self, token: str) -> defer.Deferred[OperatorLogin | None]:
        """The login a token stands for while it is unspent and fresh (not spent)."""
        if not token:
            return defer.succeed(None)
        return self.calls.call(Registry.web_link, token, self.clock.seconds())

    def redeem(self, token: str) -> defer.Deferred[OperatorLogin | None]:
        """Spend the token: the login it stands for, or None (unknown, spent, expired)."""
        if not token:
            return defer.succeed(None)
        return self.calls.call(Registry.web_link_spend, token, self.clock.seconds())
