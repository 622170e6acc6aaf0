"""Master/clone pairs in the web console: a table under the node list, and a
small section on each member's page saying which member the pair reaches now."""

from __future__ import annotations

from hub.rules.logins import may_reach
from hub.rules.pairs import Pair
from hub.rules.routes import Refusal
from hub.store.rows import Node
from hub.web.guard import SignedIn
from hub.web.html import esc, table, url_part


def _active(who: SignedIn, pair: Pair) -> str:
    active = who.reach.pair_status(pair)
    return "none (offline)" if isinstance(active, Refusal) else f"{pair.role(active)} {active}"


def _link(name: str) -> str:
    return f'<a href="/nodes/{url_part(name)}">{esc(name)}</a>'


def pairs_table(who: SignedIn) -> str:
    """The pairs this operator may see (admins all, others what their grants allow),
    as the guard read them with the session."""
    rows = [f"<tr><td>{esc(p.name)}</td><td>{_link(p.master)}</td><td>{_link(p.clone)}</td>"
            f"<td>{esc(_active(who, p))}</td></tr>"
            for p in who.reach.grants.pairs()
            if who.user.admin or may_reach(who.user.allow, p.name)]
    if not rows:
        return ""
    return "<h2>Pairs</h2>" + table(("Pair", "Master", "Clone", "Reaches now"), rows, "pairs")


def pair_of(who: SignedIn, node: Node) -> Pair | None:
    """The pair `node` is a member of, if any (as the guard read the pairs)."""
    return next((p for p in who.reach.grants.pairs() if node.name in p.members), None)


def member_section(who: SignedIn, node: Node) -> str:
    pair = pair_of(who, node)
    if pair is None:
        return ""
    role = pair.role(node.name)
    other = pair.clone if role == "master" else pair.master
    return (f'<p class="meta" id="pair">{esc(role or "")} of pair <b>{esc(pair.name)}</b> '
            f"(with {_link(other)}) · the pair reaches {esc(_active(who, pair))} now</p>")
