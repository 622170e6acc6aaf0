"""The console's pages: node list, node page with the access switch, audit; who may do what."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from memory_gateway import Site
from web_console import Browser, Console


@pytest.fixture
def console(tmp_path: Path) -> Console:
    c = Console(tmp_path)
    c.add_operator("alice", "alice-pw", ["site-*"])
    c.add_operator("root", "root-pw", [], admin=True)
    for name in ("site-a", "site-b", "lab-1"):
        c.add_node(name)
    c.add_node("site-new", state="pending")
    return c


def signed(console: Console, user: str) -> Browser:
    b = console.browser()
    assert b.sign_in(user, f"{user}-pw").status == 303
    return b


def names(page: str) -> list[str]:
    import re

    return re.findall(r'<td><a href="/nodes/[^"]+">([^<]+)</a></td>', page)


def test_node_list_search_state_and_grants(console: Console) -> None:
    root, alice = signed(console, "root"), signed(console, "alice")
    assert names(root.get("/nodes").text) == ["lab-1", "site-a", "site-b", "site-new"]
    assert names(alice.get("/nodes").text) == ["site-a", "site-b", "site-new"]
    assert names(root.get("/nodes?q=site-&state=pending").text) == ["site-new"]
    assert names(root.get("/nodes?q=%25").text) == []  # LIKE wildcards are literal
    data = json.loads(alice.get("/nodes.json?q=site").body)
    assert data["total"] == 3 and [n["name"] for n in data["nodes"]] == [
        "site-a", "site-b", "site-new"]
    assert data["nodes"][0] == {"name": "site-a", "state": "approved", "online": False,
                                "forwards": {}, "public": False, "last_seen": "-",
                                "monitoring": "-"}


def test_paging(console: Console) -> None:
    for i in range(120):
        console.add_node(f"bulk-{i:03}")
    root = signed(console, "root")
    first = root.get("/nodes?q=bulk")
    assert names(first.text)[0] == "bulk-000" and len(names(first.text)) == 50
    assert "page 1 of 3" in first.text and 'href="/nodes?q=bulk&amp;page=2"' in first.text
    assert names(root.get("/nodes?q=bulk&page=3").text)[-1] == "bulk-119"
    assert names(root.get("/nodes?q=bulk&page=99").text)[-1] == "bulk-119"


def test_ungranted_and_unknown_nodes_are_404_in_our_layout(console: Console) -> None:
    alice = signed(console, "alice")
    for path in ("/nodes/lab-1", "/nodes/nosuch", "/nodes/lab-1/terminal", "/nodes/lab-1/web/x"):
        r = alice.get(path)
        assert r.status == 404 and "no such node" in r.text.lower() and "<header>" in r.text
    assert alice.get("/nodes/site-a").status == 200


def test_admin_actions_with_csrf_audited_via_web(console: Console) -> None:
    root = signed(console, "root")
    token = root.csrf("/nodes/site-new")
    assert root.post("/nodes/site-new/approve", {"csrf": token}).status == 303
    assert console.hub.registry.node("site-new").state == "approved"
    assert root.post("/nodes/site-b/access", {"csrf": token, "value": "on"}).status == 303
    assert console.hub.registry.node("site-b").public
    assert root.post("/nodes/site-b/revoke", {"csrf": token}).status == 303
    r = root.post("/nodes/lab-1/remove", {"csrf": token})
    assert r.status == 303 and r.header("location") == "/nodes"
    assert "lab-1" not in names(root.get("/nodes").text)
    web = [(e.actor, e.action, e.target, e.detail) for e in console.hub.registry.audit_log()
           if "via web" in e.detail and e.action != "web-signin"]
    assert web == [("root@192.0.2.7", "approve", "site-new", "via web"),
                   ("root@192.0.2.7", "access", "site-b", "on via web"),
                   ("root@192.0.2.7", "revoke", "site-b", "via web"),
                   ("root@192.0.2.7", "remove", "lab-1", "via web")]
    page = root.get("/nodes/site-b").text
    assert "root@192.0.2.7" in page and "on via web" in page  # the switch's history


def test_forged_missing_or_cross_site_csrf_and_non_admins_are_refused(console: Console
                                                                      ) -> None:
    root, alice = signed(console, "root"), signed(console, "alice")
    assert root.post("/nodes/site-a/access", {"value": "on"}).status == 403
    assert root.post("/nodes/site-a/access", {"value": "on", "csrf": "forged"}).status == 403
    token = root.csrf()
    assert alice.post("/nodes/site-a/access", {"value": "on", "csrf": token}).status == 403
    cross = root.post("/nodes/site-a/access", {"value": "on", "csrf": token},
                      headers={"Origin": "https://evil.example"})
    assert cross.status == 403 and "CSRF" in cross.text
    own = alice.post("/nodes/site-a/access", {"value": "on", "csrf": alice.csrf()})
    assert own.status == 403 and "Only admins" in own.text
    assert "Switch ON" not in alice.get("/nodes/site-a").text
    assert not console.hub.registry.node("site-a").public
    # Sign-out needs the token too.
    assert alice.post("/signout", {"csrf": token}).status == 403


def test_audit_page_filters_and_non_admin_scope(console: Console) -> None:
    root, alice = signed(console, "root"), signed(console, "alice")
    page = root.get("/audit?action=approve").text
    assert page.count("<td>approve</td>") == 3
    assert "lab-1" in root.get("/audit?target=lab").text
    assert root.get("/audit?actor=nobody").text.count("<tr>") == 1  # the head only
    assert "1970-" not in root.get("/audit?since=2000-01-01").text
    assert "lab-1" not in alice.get("/audit").text


def test_access_switch_rebinds_the_live_tunnel(tmp_path: Path) -> None:
    site = Site(tmp_path)  # site-a online with an ssh forward; alice allowed site-*
    console = Console(tmp_path, hub=site.hub, factory=site.factory)
    console.add_operator("root", "root-pw", [], admin=True)
    root = signed(console, "root")
    page = root.get("/nodes/site-a").text
    assert "loopback only" in page and "</span>open</td>" in page
    assert 'href="/nodes/site-a/terminal">Web terminal' in page and "Browse" not in page
    token = root.csrf("/nodes/site-a")
    root.post("/nodes/site-a/access", {"csrf": token, "value": "on"})
    site.settle()
    assert site.tunnel is not None
    tunnel = site.hub.sessions.get("site-a")
    assert tunnel is not None and tunnel.public
    ports = [p for p in site.clock.tcpServers if p[0] in site.hub.registry.node("site-a")
             .forwards.values()]
    assert ports[-1][3] == "0.0.0.0"
    assert "public 0.0.0.0" in root.get("/nodes/site-a").text


def test_approve_of_an_online_node_verifies_the_device_login_and_pins_its_host_key(
        tmp_path: Path) -> None:
    """As `callhomehub approve` does: the hub logs in once through the tunnel."""
    from memory_hub import new_key

    site = Site(tmp_path)
    key = new_key()
    site.hub.registry.register("site-new", key.public().blob(), "fp-new", "test")
    site.call_home(key, site.sshd, "192.0.2.21")  # pending, online, not enrolled
    console = Console(tmp_path, hub=site.hub, factory=site.factory)
    console.add_operator("root", "root-pw", [], admin=True)
    root = signed(console, "root")
    logins = len(site.sshd.logins)
    assert root.post("/nodes/site-new/approve",
                     {"csrf": root.csrf("/nodes/site-new")}).status == 303
    site.settle()
    node = site.hub.registry.node("site-new")
    assert node.state == "approved"
    assert node.host_key == site.sshd.host_key.public().blob()
    assert site.sshd.logins[logins:] == [b"root"]


def test_the_proxy_cookie_stands_in_on_device_pages_only(tmp_path: Path) -> None:
    """Device pages run in an opaque origin: their links do not carry the Strict console
    cookie. The proxy cookie set on the first visit does, for /nodes/NAME/web/ only."""
    from http.cookies import SimpleCookie

    from web_console import Browser

    site = Site(tmp_path)  # site-a online, forwards ssh only
    console = Console(tmp_path, hub=site.hub, factory=site.factory)
    console.add_operator("bob", "bob-pw", ["site-*"])
    bob = signed(console, "bob")
    first = bob.get("/nodes/site-a/web/")
    assert first.status == 404 and "forwards no web service" in first.text
    (browse,) = [c for c in first.cookies() if c.startswith("__Secure-chh-browse=")]
    attributes = {a.strip().split("=")[0].lower() for a in browse.split(";")[1:]}
    assert {"secure", "httponly", "samesite", "path"} <= attributes
    assert "SameSite=none" in browse and "Path=/nodes/" in browse
    token = SimpleCookie(browse)["__Secure-chh-browse"].value

    device_page = Browser(console)  # no console cookie: what a device page's link sends
    cookie = {"Cookie": f"__Secure-chh-browse={token}"}
    assert device_page.get("/nodes/site-a/web/x", headers=cookie).status == 404  # signed in
    assert device_page.get("/nodes/site-a", headers=cookie).status == 401
    assert device_page.get("/nodes/site-a/terminal", headers=cookie).status == 401
    assert device_page.get("/nodes/site-a/web/x", headers={
        "Cookie": "__Secure-chh-browse=forged"}).status == 401
    # A form of the device's page (Origin: null) passes; another site's is refused.
    assert device_page.request("POST", "/nodes/site-a/web/x", b"a=1", headers={
        **cookie, "Origin": "null"}).status == 404
    assert device_page.request("POST", "/nodes/site-a/web/x", b"a=1", headers={
        **cookie, "Origin": "https://evil.example"}).status == 401
    # Signing out ends it too.
    bob.post("/signout", {"csrf": bob.csrf()})
    assert device_page.get("/nodes/site-a/web/x", headers=cookie).status == 401


def test_the_node_page_names_the_hub_holding_an_online_node(console: Console) -> None:
    root = signed(console, "root")
    registry = console.hub.registry
    registry.mark_online("site-b", "192.0.2.8")  # a single hub: no hub to name
    assert "on hub" not in root.get("/nodes/site-b").text
    registry.hub_id = "hub-a"
    registry.mark_online("site-a", "192.0.2.7")
    registry.hub_id = None
    assert "on hub hub-a" in root.get("/nodes/site-a").text
    registry.mark_offline("site-a")
    assert "on hub" not in root.get("/nodes/site-a").text
