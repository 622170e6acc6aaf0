"""Wiring of the web console (`--web`, `--web-url`): certificate, site and listener."""

from __future__ import annotations

import re
import socket
from typing import Any

from twisted.logger import Logger

from hub.access.server import HubSSHFactory
from hub.app.context import Hub
from hub.errors import HubError
from hub.web.certificate import (
    endpoint_with_certificate,
    ensure_certificate,
    local_names,
    uses_own_certificate,
)
from hub.web.sessions import PRUNE_EVERY, SessionStore, pruning
from hub.web.site import console_site
from hub.web.weblinks import WebLinks, url_host

log = Logger()


def _interface(endpoint: str) -> str | None:
    m = re.search(r"(?:^|:)interface=((?:\\:|[^:])+)", endpoint)
    return m.group(1).replace("\\:", ":") if m else None


def web_endpoint(hub: Hub) -> tuple[str, bool]:
    """The endpoint to listen on (with the hub's own certificate filled in) and
    whether it is TLS; logs the certificate's fingerprint."""
    endpoint = hub.config.web
    assert endpoint is not None
    if not uses_own_certificate(endpoint):
        return endpoint, endpoint.startswith("ssl:")
    interface = _interface(endpoint)
    names = local_names() + ([interface] if interface and interface not in ("0.0.0.0", "::")
                             else [])
    cert = ensure_certificate(hub.config.keys_dir, names)
    log.info("web console certificate {path}{new}: SHA256 fingerprint {fp}",
             path=cert.cert_path, new=" (new, self-signed)" if cert.created else "",
             fp=cert.fingerprint)
    return endpoint_with_certificate(endpoint, cert), True


class WebListener:
    """Knows the console's port once it listens, and says where the console is."""

    def __init__(self, hub: Hub, tls: bool) -> None:
        self.hub = hub
        self.tls = tls
        self.port: int | None = None

    def listening(self, port: Any) -> Any:
        addr = port.getHost()
        self.port = getattr(addr, "port", None)
        host = addr.host if addr.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        base = self.hub.config.web_url
        if base is None:
            assert self.hub.weblinks is not None
            base = self.hub.weblinks.base(url_host(host))
        log.info("web console at {url}/", url=base)
        return port


def build_web(hub: Hub, ssh: HubSSHFactory) -> tuple[str, Any, WebListener] | None:
    """(endpoint, site, listener) of the console, or None with --web none."""
    config = hub.config
    if config.web is None:
        return None
    try:
        endpoint, tls = web_endpoint(hub)
    except HubError as e:
        raise SystemExit(f"callhomehub: {e}") from None
    listener = WebListener(hub, tls)
    hub.weblinks = WebLinks(hub.calls, hub.clock, config.web_url, tls,
                            lambda: listener.port)
    hub.web_sessions = SessionStore(hub.calls, hub.clock, config.web_idle_timeout,
                                    config.web_absolute_timeout)
    site = console_site(hub.web_needs(ssh.password_budget, ssh.backoff, tls))
    return endpoint, site, listener


def web_prune_service(hub: Hub, reactor: Any) -> Any:
    """Expired web sessions and sign-in links deleted at start, then every
    PRUNE_EVERY seconds, a bounded number each time."""
    from twisted.application import internet

    assert hub.web_sessions is not None
    prune = internet.TimerService(PRUNE_EVERY, pruning(hub.web_sessions))
    prune.clock = reactor
    return prune


def endpoint_port(endpoint: str) -> int | None:
    """The port of a `tcp:`/`ssl:` endpoint description, None if not one or 0."""
    m = re.match(r"(?:tcp|ssl|tcp6|ssl6):(?:port=)?(\d+)(?::|$)", endpoint) or re.search(
        r"(?:^|:)port=(\d+)(?::|$)", endpoint)
    port = int(m.group(1)) if m else 0
    return port or None


def worker_weblinks(hub: Hub) -> WebLinks | None:
    """`weblink` in a worker without the console (`--workers`: worker 0 runs it, on
    this machine): a link in the shared registry, its URL --web-url or the address
    the operator reached with the port of --web. None with --web none."""
    web = hub.config.web
    if web is None:
        return None
    port = endpoint_port(web)
    if hub.config.web_url is None and port is None:
        log.warn("--web {web} has no fixed port: the sign-in links this worker gives "
                 "(weblink) leave the port out; set --web-url", web=web)
    return WebLinks(hub.calls, hub.clock, hub.config.web_url, web.startswith("ssl:"),
                    lambda: port)
