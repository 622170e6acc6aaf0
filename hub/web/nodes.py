"""The node page and its actions: forwards and their ports, the access ON/OFF switch
with its history, approve / revoke / remove for admins, monitoring, sessions.

Every change is a POST with the session's CSRF token, audited with the operator
and address (`via web`), written to the registry and applied by the hub at once
(`WebNeeds.apply`, as the registry poll applies the admin CLI's changes); the
answer (a redirect) waits until the hub has applied it. Every read and write runs
in the hub's registry thread: one call per page or action.
Also the mount points of the web terminal and the device web UI proxy.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from hub.errors import NotFound, RegistryError
from hub.rules.logins import may_reach
from hub.store.registry import Registry
from hub.store.rows import NETCONF, AuditEntry, Node
from hub.web.csrf import csrf_ok
from hub.web.errors import ErrorResource, send_error
from hub.web.guard import SignedIn, set_browse_cookie, signed_in
from hub.web.html import esc, page, post_button, table, url_part, when
from hub.web.later import Later, render_later
from hub.web.needs import WebNeeds
from hub.web.pages import NodesList
from hub.web.pairs import member_section
from hub.web.queries import CODES, node_history, recent_results

log = Logger()

ACTIONS = (b"access", b"approve", b"revoke", b"remove")
SESSION_ACTIONS = ("gateway", "jump", "browse")
NO_NODE = "There is no such node, or you may not see it."


def visible_node(who: SignedIn, name: str) -> Node | None:
    """The node if this operator may see it: admins all, others what their grants
    allow (the node as the guard read it with the session)."""
    try:
        node = who.reach.grants.node(name)
    except NotFound:
        return None
    if who.user.admin or may_reach(who.user.allow, node.name):
        return node
    return None


@frozen
class NodeReads:
    """What the node page shows from the registry besides the node: read in one call."""

    access: list[AuditEntry]
    results: list[tuple[str, str, int, str, float]]
    sessions: list[AuditEntry]


def read_node(registry: Registry, name: str) -> NodeReads:
    """In the registry thread: the node page's history, monitoring and sessions."""
    return NodeReads(node_history(registry, name, ("access",)), recent_results(registry, name),
                     node_history(registry, name, SESSION_ACTIONS))


class NodesResource(Resource):
    """/nodes and everything below it."""

    def __init__(self, needs: WebNeeds) -> None:
        super().__init__()
        self.needs = needs
        self.list = NodesList(needs)

    def render(self, request: Any) -> Any:
        return self.list.render(request)

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self.list
        name = path.decode("utf-8", "replace")
        return Later(lambda request: self._node(request, name))

    def _node(self, request: Any, name: str) -> defer.Deferred[Resource]:
        """The node's resource once the session and the node are read (off the
        reactor); the rest of the path is found below it."""
        def found(who: SignedIn | None) -> Resource:
            if who is None:
                return ErrorResource(401, "Your session has ended; sign in again.")
            node = visible_node(who, name)
            if node is None:
                return ErrorResource(404, NO_NODE, who.viewer)
            return NodeResource(self.needs, who, node)

        browse = request.postpath[:1] == [b"web"]
        return signed_in(self.needs, request, browse=browse, names=(name,)).addCallback(found)


class NodeResource(Resource):
    def __init__(self, needs: WebNeeds, who: SignedIn, node: Node) -> None:
        super().__init__()
        self.needs = needs
        self.who = who
        self.node = node

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        if path in (b"terminal", b"web"):
            factory = self.needs.terminal if path == b"terminal" else self.needs.proxy
            if factory is None:
                return ErrorResource(404, "This hub does not offer that page.", self.who.viewer)
            if path == b"web":
                set_browse_cookie(request, self.who.session)
            return factory(self.who.reach, self.node.name)  # type: ignore[return-value]
        if path in ACTIONS and not request.postpath:
            return NodeAction(self.needs, self.who, self.node, path.decode())
        return ErrorResource(404, "There is no such page on this hub.", self.who.viewer)

    def render_GET(self, request: Any) -> int:
        def show(reads: NodeReads) -> bytes:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return page(self.node.name, node_body(self.needs, self.who, self.node, reads),
                        self.who.viewer, scripts=["/static/live.js"])

        return render_later(request, self.needs.calls.call(read_node, self.node.name), show,
                            self.who.viewer)


def forwards_table(needs: WebNeeds, node: Node) -> str:
    tunnel = needs.tunnels.get(node.name)
    live = {f.service: f for f in tunnel.table} if tunnel is not None else {}
    rows = []
    for service, port in node.forwards.items():
        forward = live.get(service)
        listener = tunnel.listeners.get(forward) if tunnel and forward else None
        is_open = listener is not None and listener.port is not None
        where = ("public " + tunnel.interface if tunnel and tunnel.public else "loopback only"
                 ) if is_open and tunnel else "-"
        rows.append(f"<tr><td>{esc(service)}</td><td>{port}</td>"
                    f'<td><span class="dot {"online" if is_open else "offline"}"></span>'
                    f'{"open" if is_open else "closed"}</td><td>{esc(where)}</td></tr>')
    if not rows:
        return '<p class="hint">No forwards leased yet.</p>'
    return table(("Service", "SDT port", "Listener", "Where"), rows, "forwards")


def node_body(needs: WebNeeds, who: SignedIn, node: Node, reads: NodeReads) -> str:
    viewer = who.viewer
    base = f"/nodes/{url_part(node.name)}"
    online = "online" if node.online else "offline"
    head = (f'<h1>{esc(node.name)} <span class="state {esc(node.state)}">{esc(node.state)}'
            f'</span> <span class="dot {online}"></span><small>{online}</small></h1>'
            f'<p class="meta">{esc(node.kind)} · key {esc(node.fingerprint or "-")} · '
            f'last seen {esc(when(node.last_seen))} · from {esc(node.peer or "-")}'
            f'{f" · on hub {esc(node.hub)}" if node.online and node.hub else ""}</p>')
    links = []
    if node.online and "ssh" in node.forwards:
        links.append(f'<a class="button" href="{base}/terminal">Web terminal</a>')
    if node.online and ({"http", "https"} & set(node.forwards)):
        links.append(f'<a class="button" href="{base}/web/">Browse</a>')
    admin = ""
    if viewer.admin:
        buttons = []
        if node.state != "approved":
            buttons.append(post_button(viewer, f"{base}/approve", "Approve", "primary"))
        if node.state != "revoked":
            buttons.append(post_button(viewer, f"{base}/revoke", "Revoke", "danger",
                                       confirm=f"Revoke {node.name}?"))
        buttons.append(post_button(viewer, f"{base}/remove", "Remove", "danger",
                                   confirm=f"Remove {node.name} and its port leases?"))
        admin = f'<div class="actions">{"".join(buttons)}</div>'
    switch_state = "ON" if node.public else "OFF"
    switch = (f'<section class="switch"><h2>Public access <span id="access" class="access '
              f'{switch_state.lower()}">{switch_state}</span></h2>'
              '<p class="hint">ON: the node\'s ports listen on the public interface; '
              'OFF: on loopback only (reached through the hub).</p>')
    if viewer.admin:
        switch += post_button(viewer, f"{base}/access", f"Switch {'OFF' if node.public else 'ON'}",
                              "primary", fields=[("value", "off" if node.public else "on")])
    history = reads.access
    switch += "<h3>History</h3>" + (table(
        ("When", "Who", "Switched"),
        [f"<tr><td>{esc(when(e.time))}</td><td>{esc(e.actor)}</td>"
         f"<td>{esc(e.detail)}</td></tr>" for e in history], "history")
        if history else '<p class="hint">Never switched.</p>') + "</section>"
    results = reads.results
    monitoring = "<h2>Monitoring</h2>" + (table(
        ("When", "Host", "Service", "State", "Output"),
        [f"<tr><td>{esc(when(t))}</td><td>{esc(h)}</td><td>{esc(s or '(host)')}</td>"
         f'<td><span class="mon {esc(CODES.get(c, "?").lower())}">{esc(CODES.get(c, c))}'
         f"</span></td><td>{esc(o.splitlines()[0] if o else '')}</td></tr>"
         for h, s, c, o, t in results], "results")
        if results else '<p class="hint">No monitoring results.</p>')
    sessions = reads.sessions
    session_html = "<h2>Sessions</h2>" + (table(
        ("When", "Who", "Kind", "Detail"),
        [f"<tr><td>{esc(when(e.time))}</td><td>{esc(e.actor)}</td><td>{esc(e.action)}</td>"
         f"<td>{esc(e.detail)}</td></tr>" for e in sessions], "sessions")
        if sessions else '<p class="hint">No sessions yet.</p>')
    head += member_section(who, node)
    return (f'{head}<div class="links">{"".join(links)}</div>{admin}'
            f'<h2>Forwards</h2>{forwards_table(needs, node)}{switch}{monitoring}{session_html}')


def change_node(registry: Registry, action: str, name: str, actor: str,
                public: bool | None) -> None:
    """In the registry thread: one of the admin's changes, audited `via web`."""
    if action == "access":
        assert public is not None
        registry.set_public(name, public, actor, "via web")
    elif action == "remove":
        registry.remove(name, actor, "via web")
    else:
        registry.set_state(name, {"approve": "approved", "revoke": "revoked"}[action], actor,
                           "via web")


class NodeAction(Resource):
    """POST /nodes/NAME/{access,approve,revoke,remove}: admins only."""

    isLeaf = True

    def __init__(self, needs: WebNeeds, who: SignedIn, node: Node, action: str) -> None:
        super().__init__()
        self.needs = needs
        self.who = who
        self.node = node
        self.action = action

    def render_POST(self, request: Any) -> Any:
        who, node, needs = self.who, self.node, self.needs
        if not csrf_ok(request, who.session):
            log.info("web: CSRF check failed for {actor} on {node}", actor=who.actor,
                     node=node.name)
            return send_error(request, 403, "The form was stale or forged (CSRF check "
                              "failed); reload the page and try again.", who.viewer)
        if not who.user.admin:
            log.info("web: {actor} may not {action} {node} (not an admin)", actor=who.actor,
                     action=self.action, node=node.name)
            return send_error(request, 403, f"Only admins may {self.action} nodes.",
                              who.viewer)
        public: bool | None = None
        if self.action == "access":
            value = (request.args or {}).get(b"value", [b""])[0]
            if value not in (b"on", b"off"):
                return send_error(request, 400, "access: value must be on or off",
                                  who.viewer)
            public = value == b"on"
        where = "/nodes" if self.action == "remove" else f"/nodes/{url_part(node.name)}"

        def changed(_: object) -> defer.Deferred[bytes]:
            log.info("web: {actor} {action} {node}", actor=who.actor, action=self.action,
                     node=node.name)
            # The answer waits for the hub to act on the change: the page loaded
            # after the redirect shows it, a revoked node's sessions are gone.
            return needs.apply().addErrback(not_applied).addCallback(redirect)

        def not_applied(f: Failure) -> None:
            log.error("web: {node}: the change is written but applying it failed: {why}; "
                      "the hub applies it with the next change", node=node.name,
                      why=f.getErrorMessage())

        def redirect(_: object) -> bytes:
            if self.action == "approve":
                self._verify(node)
            request.setResponseCode(303)
            request.setHeader(b"location", where.encode())
            return b""

        def refused(f: Failure) -> bytes | Failure:
            if f.check(NotFound):
                return send_error(request, 404, NO_NODE, who.viewer)
            if f.check(RegistryError):  # a pair's member is not removed before its pair
                return send_error(request, 409, f.getErrorMessage(), who.viewer)
            return f

        done = needs.calls.call(change_node, self.action, node.name, who.actor, public)
        return render_later(request, done.addCallbacks(changed, refused), viewer=who.viewer)

    def _verify(self, node: Node) -> None:
        """As `callhomehub approve`: log in once through the tunnel and pin the host key
        (in the background: the page does not wait for the device; the node page shows
        the pinned key, the log says what happened)."""
        needs, name = self.needs, self.node.name
        if (needs.verify is None or node.kind == NETCONF or node.host_key is not None
                or needs.tunnels.get(name) is None):
            return

        def failed(f: Failure) -> None:
            log.warn("web: {node} approved, but the device login was not verified: {why}",
                     node=name, why=f.getErrorMessage())

        needs.verify(name, self.who.actor).addCallbacks(
            lambda message: log.info("web: {node}: {message}", node=name, message=message),
            failed)
