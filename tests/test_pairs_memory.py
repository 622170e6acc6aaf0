"""Master/clone pairs in memory: the pair's name routes to the master, else the clone;
its own port follows the active member; switches are audited."""

from __future__ import annotations

from pathlib import Path

import pytest
from memory_gateway import DeviceSSHD, Site, exec_, shell
from memory_hub import new_key, outcome
from test_fleet import outcomes
from test_fleet import run as fleet_run
from twisted.internet.testing import StringTransport

from hub.rules.chooser import PROMPT


class PairSite(Site):
    """Site plus nodes pbx-a (master) and pbx-b (clone), each its own device sshd,
    both calling home, pair `pbx`; bob is allowed `pbx`, carol `pbx-a`."""

    def __init__(self, tmp_path: Path) -> None:
        Site.__init__(self, tmp_path)
        self.sshd_a = DeviceSSHD(self.clock, self.hub.keys.mgmt)
        self.sshd_b = DeviceSSHD(self.clock, self.hub.keys.mgmt)
        self.key_a = self.enroll("pbx-a", self.sshd_a)
        self.key_b = self.enroll("pbx-b", self.sshd_b)
        self.tunnel_a = self.call_home(self.key_a, self.sshd_a, "192.0.2.31")
        self.tunnel_b = self.call_home(self.key_b, self.sshd_b, "192.0.2.32")
        self.bob, self.carol = new_key(), new_key()
        registry = self.hub.registry
        registry.add_user("bob", None, [(self.bob.public().blob(), "fb")], ["pbx"], "t")
        registry.add_user("carol", None, [(self.carol.public().blob(), "fc")], ["pbx-a"], "t")
        registry.add_pair("pbx", "pbx-a", "pbx-b", "t")
        self.hub.apply()  # as the registry poll does after the CLI's change
        self.settle()



@pytest.fixture
def site(tmp_path: Path) -> PairSite:
    return PairSite(tmp_path)


def switches(site: Site) -> list[str]:
    return [e.detail for e in site.hub.registry.audit_log() if e.action == "pair-switch"]


def test_the_pair_routes_to_the_master_and_to_the_clone_when_the_master_is_lost(
        site: PairSite) -> None:
    chan = site.operator(b"bob:pbx", exec_(b"hostname"), key=site.bob)
    assert (chan.out, chan.status) == (b"ran hostname as root\n", 0)
    assert (site.sshd_a.logins, site.sshd_b.logins) == ([b"root"], [])
    assert switches(site) == ["from none to pbx-a"]
    # The master's tunnel goes away: the clone answers at once.
    site.tunnel_a.transport.loseConnection()
    site.settle()
    assert site.hub.sessions.get("pbx-a") is None
    chan = site.operator(b"bob:PBX", exec_(b"hostname"), key=site.bob)
    assert (chan.out, chan.status) == (b"ran hostname as root\n", 0)
    assert (site.sshd_a.logins, site.sshd_b.logins) == ([b"root"], [b"root"])
    assert switches(site) == ["from none to pbx-a", "from pbx-a to pbx-b"]
    # The master calls back: it is the active member again.
    site.tunnel_a = site.call_home(site.key_a, site.sshd_a, "192.0.2.31")
    site.operator(b"bob:pbx", exec_(b"hostname"), key=site.bob)
    assert site.sshd_a.logins == [b"root", b"root"]
    assert switches(site)[-1] == "from pbx-b to pbx-a"
    # Neither online: refused as offline.
    site.tunnel_a.transport.loseConnection()
    site.settle()
    site.tunnel_b.transport.loseConnection()
    site.settle()
    chan = site.operator(b"bob:pbx", exec_(b"hostname"), key=site.bob)
    assert chan.err == (b"callhomehub: pair pbx is offline (master pbx-a and clone pbx-b "
                        b"are both offline)\r\n")
    assert switches(site)[-2:] == ["from pbx-a to pbx-b", "from pbx-b to none"]


def test_a_revoked_master_is_not_online(site: PairSite) -> None:
    site.hub.registry.set_state("pbx-a", "pending", "t")
    site.hub.apply()
    site.operator(b"bob:pbx", exec_(b"hostname"), key=site.bob)
    assert (site.sshd_a.logins, site.sshd_b.logins) == ([], [b"root"])


def test_grants_on_the_pair_cover_its_members_not_the_other_way(site: PairSite) -> None:
    chan = site.operator(b"bob:pbx-b", exec_(b"hostname"), key=site.bob)
    assert chan.status == 0 and site.sshd_b.logins == [b"root"]
    chan = site.operator(b"carol:pbx", exec_(b"hostname"), key=site.carol)
    assert chan.err == b"callhomehub: node 'pbx' does not exist or you may not reach it\r\n"
    chan = site.operator(b"carol:pbx-a", exec_(b"hostname"), key=site.carol)
    assert chan.status == 0
    # The chooser lists the pair as one entry, saying which member it reaches.
    chan = site.operator(b"bob", shell(), key=site.bob)
    assert chan.out == b"1: pbx (online, pair: master pbx-a)\r\nq: quit\r\n" + PROMPT


def test_the_pair_port_follows_the_active_member(site: PairSite) -> None:
    pairs = site.hub.sessions.pairs
    [(service, port)] = pairs.ports("pbx").items()
    assert service == "ssh"
    pair = site.hub.registry.pair("pbx")
    assert pair is not None and (pair.forwards, pair.live) == ({"ssh": port}, {"ssh"})
    [factory] = [f for p, f, _, iface in site.clock.tcpServers
                 if p == port and iface == "127.0.0.1"]

    def connect() -> None:
        end = factory.buildProtocol(None)
        end.makeConnection(StringTransport())
        site.settle()

    connect()
    tunnel_a = site.hub.sessions.get("pbx-a")
    assert tunnel_a is not None and len(tunnel_a.pipes) == 1
    site.tunnel_a.transport.loseConnection()
    site.settle()
    # Same port, now into the clone's forward.
    assert pairs.ports("pbx") == {"ssh": port}
    connect()
    tunnel_b = site.hub.sessions.get("pbx-b")
    assert tunnel_b is not None and len(tunnel_b.pipes) == 1
    # Neither member online: no pair port; the lease stays the pair's.
    site.tunnel_b.transport.loseConnection()
    site.settle()
    assert pairs.ports("pbx") == {}
    pair = site.hub.registry.pair("pbx")
    assert pair is not None and (pair.forwards, pair.live) == ({"ssh": port}, set())


def test_run_takes_a_pair_by_its_name_on_its_active_member(site: PairSite) -> None:
    _, lines = fleet_run(site, nodes="pbx", command="uptime")
    assert lines[0] == {"plan": {"nodes": 1, "offline": 0}}
    assert [o.node for o in outcomes(lines).values()] == ["pbx-a"]
    assert (site.sshd_a.logins, site.sshd_b.logins) == ([b"root"], [])
    site.tunnel_a.transport.loseConnection()
    site.settle()
    fleet_run(site, nodes="pbx", command="uptime")
    assert site.sshd_b.logins == [b"root"]
    # `pbx*` matches the members themselves: each runs once, the pair is not run again.
    _, lines = fleet_run(site, nodes="pbx*", command="uptime")
    assert sorted(outcomes(lines)) == ["pbx-a", "pbx-b"]


def test_access_on_moves_the_pair_port_to_the_public_interface_and_back(
        site: PairSite) -> None:
    pairs = site.hub.sessions.pairs
    [(_, port)] = pairs.ports("pbx").items()

    def interfaces() -> list[str]:
        return [iface for p, f, _, iface in site.clock.tcpServers if p == port]

    assert interfaces() == ["127.0.0.1"]
    site.hub.registry.set_pair_public("pbx", True, "t")
    site.hub.apply()
    site.settle()
    public = site.hub.sessions.public_interface
    assert interfaces() == ["127.0.0.1", public] and pairs.ports("pbx") == {"ssh": port}
    site.hub.registry.set_pair_public("pbx", False, "t")
    site.hub.apply()
    site.settle()
    assert interfaces() == ["127.0.0.1", public, "127.0.0.1"]
    assert pairs.ports("pbx") == {"ssh": port}



def test_a_master_tunnel_not_forwarding_yet_is_not_online(site: PairSite) -> None:
    site.tunnel_a.transport.loseConnection()
    site.settle()
    # Between a connection's first forward request (which attaches it) and the
    # forward itself, its tunnel forwards nothing: the clone is still the one reached.
    tunnel = outcome(site.hub, site.hub.sessions.attach("pbx-a", site.tunnel_b.service,
                                                        "192.0.2.31"))
    assert tunnel is not None and not len(tunnel.table)
    assert site.hub.sessions.pairs.active("pbx") == "pbx-b"
    chan = site.operator(b"bob:pbx", exec_(b"hostname"), key=site.bob)
    assert chan.status == 0 and (site.sshd_a.logins, site.sshd_b.logins) == ([], [b"root"])
