"""The node list: search by name and state, paging, and its JSON view for live refresh."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.web.resource import Resource

from hub.store.registry import Registry
from hub.store.rows import STATES, Node
from hub.web.errors import send_error
from hub.web.guard import SignedIn, SignedInPage, signed_in
from hub.web.html import esc, page, pager, query, table, url_part, when
from hub.web.later import render_later
from hub.web.needs import WebNeeds
from hub.web.pairs import pairs_table
from hub.web.queries import CODES, NodePage, node_page, visible_filter

PER_PAGE = 50
HEAD = ("Name", "State", "Online", "Services and ports", "Public access", "Last seen",
        "Monitoring")


def arg(request: Any, name: bytes, limit: int = 200) -> str:
    values = (request.args or {}).get(name) or [b""]
    return bytes(values[0])[:limit].decode("utf-8", "replace").strip()


def int_arg(request: Any, name: bytes, default: int = 1) -> int:
    text = arg(request, name, 12)
    return int(text) if text.isdigit() else default


def services(node: Node) -> str:
    return " ".join(f"{s}={p}" for s, p in node.forwards.items()) or "-"


def node_json(node: Node, code: int | None) -> dict[str, Any]:
    return {"name": node.name, "state": node.state, "online": node.online,
            "forwards": node.forwards, "public": node.public, "last_seen": when(node.last_seen),
            "monitoring": CODES.get(code, str(code)) if code is not None else "-"}


def row(item: dict[str, Any]) -> str:
    name = item["name"]
    online = "online" if item["online"] else "offline"
    fwd = " ".join(f"{s}={p}" for s, p in item["forwards"].items()) or "-"
    mon = item["monitoring"]
    return (f'<tr><td><a href="/nodes/{esc(url_part(name))}">{esc(name)}</a></td>'
            f'<td><span class="state {esc(item["state"])}">{esc(item["state"])}</span></td>'
            f'<td><span class="dot {online}"></span>{online}</td><td>{esc(fwd)}</td>'
            f'<td>{"on" if item["public"] else "off"}</td><td>{esc(item["last_seen"])}</td>'
            f'<td><span class="mon {esc(mon.lower())}">{esc(mon)}</span></td></tr>')


class NodeList:
    """What both views of the list read from a request, read in one registry call."""

    def __init__(self, who: SignedIn, request: Any) -> None:
        self.search = arg(request, b"q", 64)
        state = arg(request, b"state", 16)
        self.state = state if state in STATES else ""
        self.page_no = int_arg(request, b"page")
        self.visible = visible_filter(who.user.admin, who.user.allow)
        self.result = NodePage([], {}, 0, 1, 1)
        self.items: list[dict[str, Any]] = []

    def read(self, needs: WebNeeds) -> defer.Deferred[NodeList]:
        def got(result: NodePage) -> NodeList:
            self.result = result
            self.items = [node_json(n, result.monitoring.get(n.name.lower()))
                          for n in result.nodes]
            return self

        return needs.calls.call(read_node_page, self.search, self.state, self.page_no,
                                PER_PAGE, self.visible).addCallback(got)


def read_node_page(registry: Registry, search: str, state: str, page_no: int, per_page: int,
                   visible: Callable[[str], bool] | None) -> NodePage:
    """In the registry thread: one page of the list (`queries.node_page`)."""
    return node_page(registry, search, state, page_no, per_page, visible)


class NodesList(SignedInPage):
    """GET /nodes."""

    def show(self, request: Any, who: SignedIn) -> defer.Deferred[bytes]:
        return NodeList(who, request).read(self.needs).addCallback(self._page, request, who)

    def _page(self, view: NodeList, request: Any, who: SignedIn) -> bytes:
        result = view.result
        options = "".join(
            f'<option value="{s}"{" selected" if s == view.state else ""}>{s or "any state"}'
            '</option>' for s in ("", *STATES))
        search = (f'<form method="get" action="/nodes" class="search" role="search">'
                  f'<input name="q" placeholder="name contains" value="{esc(view.search)}">'
                  f'<select name="state">{options}</select><button type="submit">Search'
                  '</button></form>')
        count = (f'<p class="count" id="count">{result.total} node'
                 f'{"" if result.total == 1 else "s"}</p>')
        body = (f'<h1>Nodes</h1>{search}{count}'
                f'{table(HEAD, [row(i) for i in view.items], "nodes", "node-table")}'
                f'{pager("/nodes", result.page, result.pages, q=view.search, state=view.state)}'
                f'{pairs_table(who)}'
                f'<p class="hint" id="live" data-src="/nodes.json'
                f'{esc(query(q=view.search, state=view.state, page=result.page))}">'
                'The list refreshes by itself every few seconds.</p>')
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page("Nodes", body, who.viewer, scripts=["/static/live.js"])


class NodesJSON(Resource):
    """GET /nodes.json: one page of the list as data, for live refresh."""

    isLeaf = True

    def __init__(self, needs: WebNeeds) -> None:
        super().__init__()
        self.needs = needs

    def render_GET(self, request: Any) -> int:
        def read(who: SignedIn | None) -> bytes | defer.Deferred[bytes]:
            if who is None:
                return send_error(request, 401, "Your session has ended; sign in again.")
            return NodeList(who, request).read(self.needs).addCallback(answer)

        def answer(view: NodeList) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"total": view.result.total, "page": view.result.page,
                               "pages": view.result.pages, "nodes": view.items}).encode()

        return render_later(request, signed_in(self.needs, request), read)
