"""One-time sign-in links: `ssh alice@hub weblink` prints one, valid for 60 seconds.

The link carries a 256-bit token bound to the SSH login that asked for it (so it
lapses with that login's key or password); redeeming it spends it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

from hub.rules.logins import OperatorLogin

LINK_TTL = 60.0


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@define(eq=False)
class WebLinks:
    """Implements `hub.access.needs.WebLinks` for the gateway."""

    clock: IReactorTime
    # The console's base URL (--web-url), else None: built from where the operator
    # reached the hub, with the web port and scheme.
    base_url: str | None
    tls: bool
    port: Callable[[], int | None]
    ttl: float = LINK_TTL
    max_links: int = 1000
    _links: dict[str, tuple[OperatorLogin, float]] = field(factory=dict)

    def issue(self, login: OperatorLogin, arrived_at: str) -> str:
        """A new sign-in URL for `login` (its host: --web-url, else `arrived_at`)."""
        now = self.clock.seconds()
        self._links = {t: v for t, v in self._links.items() if v[1] > now}
        while len(self._links) >= self.max_links:
            self._links.pop(next(iter(self._links)))
        token = secrets.token_urlsafe(32)
        self._links[token] = (login, now + self.ttl)
        return f"{self.base(arrived_at)}/signin/{token}"

    def base(self, host: str) -> str:
        if self.base_url is not None:
            return self.base_url
        scheme = "https" if self.tls else "http"
        port = self.port()
        default = 443 if self.tls else 80
        suffix = "" if port in (None, default) else f":{port}"
        return f"{scheme}://{url_host(host)}{suffix}"

    def valid(self, token: str) -> OperatorLogin | None:
        """The login a token stands for while it is unspent and fresh (not spent)."""
        entry = self._links.get(token)
        if entry is None or entry[1] <= self.clock.seconds():
            return None
        return entry[0]

    def redeem(self, token: str) -> OperatorLogin | None:
        """Spend the token: the login it stands for, or None (unknown, spent, expired)."""
        login = self.valid(token)
        self._links.pop(token, None)
        return login
