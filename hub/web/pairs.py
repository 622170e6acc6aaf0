"""Master/clone pairs in the web console: a table under the node list, and a
small section on each member's page saying which member the pair reaches now."""

from __future__ import annotations

from hub.rules.logins import may_reach
from hub.rules.pairs import Pair
from hub.rules.routes import Refusal
from hub.store.rows import Node
from hub.web.guard import SignedIn
from hub.web.html import esc, table, url_part
from hub.web.needs import WebNeeds


def _active(who: SignedIn, pair: Pair) -> str:
    active = who.reach.pair_status(pair)
    return "none (offline)" if isinstance(active, Refusal) else f"{pair.role(active)} {active}"


def _link(name: str) -> str:
    return f'<a href="/nodes/{url_part(name)}">{esc(name)}</a>'


def pairs_table(needs: WebNeeds, who: SignedIn) -> str:
    """The pairs this operator may see (admins all, others what their grants allow)."""
    rows = [f"<tr><td>{esc(p.name)}</td><td>{_link(p.master)}</td><td>{_link(p.clone)}</td>"
            f"<td>{esc(_active(who, p))}</td></tr>"
            for p in needs.registry.pairs() if who.user.admin or may_reach(who.user.allow, p.name)]
    if not rows:
        return ""
    return "<h2>Pairs</h2>" + table(("Pair", "Master", "Clone", "Reaches now"), rows, "pairs")


def member_section(needs: WebNeeds, who: SignedIn, node: Node) -> str:
    pair = needs.registry.pair_of(node.name)
    if pair is None:
        return ""
    role = pair.role(node.name)
    other = pair.clone if role == "master" else pair.master
    return (f'<p class="meta" id="pair">{esc(role or "")} of pair <b>{esc(pair.name)}</b> '
            f"(with {_link(other)}) · the pair reaches {esc(_active(who, pair))} now</p>")
