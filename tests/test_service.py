from __future__ import annotations

from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins

from callhomehub.service import Options, makeService


def test_twistd_finds_the_plugin() -> None:
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert makers["callhomehub"].module == "callhomehub.service"
    assert makers["callhomehub"].options is Options


def test_make_service_listens_and_polls(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:2222:interface=127.0.0.1"])
    reactor = MemoryReactorClock()
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    [(port, factory, _backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (2222, "127.0.0.1")
    assert factory.limits.login_timeout == 120
    assert (tmp_path / "hub.sqlite3").exists() and (tmp_path / "keys").is_dir()
    hub = top.hub  # type: ignore[attr-defined]
    other = type(hub.registry)(str(tmp_path / "hub.sqlite3"), now=reactor.seconds)
    other.register("site-a", b"k", "fp", "cli")
    reactor.advance(1.0)
    assert not hub.registry.changed()  # the poll already consumed the change
    top.stopService()
