"""`ssh alice@hub weblink`: a one-time web console sign-in URL, in memory."""

from __future__ import annotations

import re
from pathlib import Path

from memory_gateway import Site, exec_
from memory_hub import outcome

from hub.web.weblinks import WebLinks


def test_weblink_prints_a_one_time_url_and_is_audited(tmp_path: Path) -> None:
    site = Site(tmp_path)
    links = WebLinks(site.hub.calls, site.clock, None, True, lambda: 8443)
    site.hub.weblinks = links
    chan = site.operator(b"alice", exec_(b"weblink"))
    # The host is the address the operator's connection arrived at.
    match = re.fullmatch(rb"https://(\S+):8443/signin/([A-Za-z0-9_-]{43})\n", chan.out)
    assert match, chan.out
    assert chan.status == 0 and chan.is_closed
    login = outcome(site.hub, links.redeem(match.group(2).decode()))
    assert login is not None and login.user == "alice"
    assert outcome(site.hub, links.redeem(match.group(2).decode())) is None  # spent
    [entry] = [e for e in site.hub.registry.audit_log() if e.action == "weblink"]
    assert entry.target == "alice" and entry.actor == "alice@192.0.2.10"


def test_weblink_with_web_url_and_when_the_console_is_off(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.hub.weblinks = WebLinks(site.hub.calls, site.clock, "https://hub.example.com", True,
                                 lambda: 443)
    chan = site.operator(b"alice", exec_(b"weblink"))
    assert chan.out.startswith(b"https://hub.example.com/signin/")
    (tmp_path / "off").mkdir()
    off = Site(tmp_path / "off")
    chan = off.operator(b"alice", exec_(b"weblink"))
    assert chan.err == (b"callhomehub: the web console is off on this hub "
                        b"(started with --web none)\r\n")
    assert chan.status == 1 and chan.out == b""
