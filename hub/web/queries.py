"""The reads behind the console's pages, fast with ten thousand nodes.

The node list reads names and states only to filter and count, then the full rows,
leases and latest monitoring states of one page of nodes; the audit page filters
and pages in SQL. Grants are glob patterns (`hub.rules.logins.may_reach`), so a
non-admin's list is filtered here rather than in SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from attrs import frozen

from hub.rules.logins import reach_matcher
from hub.store.rows import AUDIT_COLUMNS, NODE_COLUMNS, AuditEntry, Node, select


class Reads(Protocol):
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...


CODES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
# Which of a node's latest results stands for it: the worst.
_WORST = {0: 0, 3: 1, 1: 2, 2: 3}


@frozen
class NodePage:
    nodes: list[Node]
    monitoring: dict[str, int]  # node name (lower case) -> worst latest result code
    total: int
    page: int
    pages: int


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def node_page(db: Reads, search: str, state: str, page: int, per_page: int,
              visible: Callable[[str], bool] | None) -> NodePage:
    """One page of nodes whose name contains `search` (and in `state` if given),
    among those `visible` allows (None: all), ordered by name."""
    where = "kind != 'pair' AND name LIKE ? ESCAPE '\\' AND (? = '' OR state = ?)"
    params = (_like(search), state, state)
    if visible is None:  # counted and paged in SQL
        (total,) = db.query(f"SELECT COUNT(*) FROM nodes WHERE {where}", params)[0]  # noqa: S608
        pages = max(1, -(-int(total) // per_page))
        page = min(max(1, page), pages)
        ids = [r[0] for r in db.query(
            f"SELECT id FROM nodes WHERE {where} ORDER BY name COLLATE NOCASE"  # noqa: S608
            " LIMIT ? OFFSET ?", (*params, per_page, (page - 1) * per_page))]
        return _page(db, ids, int(total), page, pages)
    rows = [r for r in db.query(f"SELECT id, name FROM nodes WHERE {where}"  # noqa: S608
                                " ORDER BY name COLLATE NOCASE", params) if visible(r[1])]
    total = len(rows)
    pages = max(1, -(-total // per_page))
    page = min(max(1, page), pages)
    ids = [r[0] for r in rows[(page - 1) * per_page: page * per_page]]
    return _page(db, ids, total, page, pages)


def _page(db: Reads, ids: list[int], total: int, page: int, pages: int) -> NodePage:
    nodes = nodes_by_id(db, ids)
    return NodePage(nodes, latest_codes(db, [n.name for n in nodes]), total, page, pages)


def nodes_by_id(db: Reads, ids: list[int]) -> list[Node]:
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    found = {row[0]: row for row in db.query(
        f"{select(NODE_COLUMNS, 'nodes')} WHERE id IN ({marks})", tuple(ids))}
    forwards: dict[int, dict[str, int]] = {}
    for node_id, service, port in db.query(
            f"SELECT node_id, service, port FROM leases WHERE node_id IN ({marks})"  # noqa: S608
            " ORDER BY port", tuple(ids)):
        forwards.setdefault(node_id, {})[service] = port
    return [Node.from_row(found[i], forwards.get(i, {})) for i in ids if i in found]


def latest_codes(db: Reads, names: list[str]) -> dict[str, int]:
    """The worst latest result of each node's own Nagios host (the host named like
    the node, as strict-host mode requires): read through the results' (host,
    service, id) index, so a page costs the same with any number of results."""
    if not names:
        return {}
    marks = ",".join("?" * len(names))
    inner = f"SELECT MAX(id) FROM results WHERE host IN ({marks})"  # noqa: S608
    sql = f"SELECT host, code FROM results WHERE id IN ({inner} GROUP BY host, service)"  # noqa: S608
    worst: dict[str, int] = {}
    for host, code in db.query(sql, tuple(names)):
        key = str(host).lower()
        if key not in worst or _WORST.get(code, 1) > _WORST.get(worst[key], 1):
            worst[key] = code
    return worst


def recent_results(db: Reads, node: str, limit: int = 20) -> list[tuple[str, str, int, str, float]]:
    """The node's latest results, newest first: (host, service, code, output, time)."""
    return [(str(h), str(s), int(c), str(o), float(t)) for h, s, c, o, t in db.query(
        "SELECT host, service, code, output, time FROM results WHERE node = ? COLLATE NOCASE"
        " ORDER BY id DESC LIMIT ?", (node, limit))]


def visible_filter(admin: bool, allow: tuple[str, ...]) -> Callable[[str], bool] | None:
    """Admins see every node (to approve new ones); others what their grants allow."""
    if admin:
        return None
    return reach_matcher(allow)


@frozen
class AuditFilter:
    actor: str = ""
    action: str = ""
    target: str = ""
    since: float | None = None
    until: float | None = None


@frozen
class AuditPage:
    entries: list[AuditEntry]
    total: int
    page: int
    pages: int


def audit_page(db: Reads, f: AuditFilter, page: int, per_page: int,
               visible: Callable[[str], bool] | None = None) -> AuditPage:
    """Audit entries matching `f`, newest first (actor and target by substring,
    action exactly); `visible`, if given, keeps entries about nodes it allows."""
    where = ("actor LIKE ? ESCAPE '\\' AND target LIKE ? ESCAPE '\\'"
             " AND (? = '' OR action = ?) AND (? IS NULL OR time >= ?)"
             " AND (? IS NULL OR time < ?)")
    params: tuple[Any, ...] = (_like(f.actor), _like(f.target), f.action, f.action,
                               f.since, f.since, f.until, f.until)
    if visible is None:
        (total,) = db.query(f"SELECT COUNT(*) FROM audit WHERE {where}", params)[0]  # noqa: S608
        pages = max(1, -(-int(total) // per_page))
        page = min(max(1, page), pages)
        rows = db.query(f"{select(AUDIT_COLUMNS, 'audit')} WHERE {where}"
                        " ORDER BY id DESC LIMIT ? OFFSET ?",
                        (*params, per_page, (page - 1) * per_page))
        return AuditPage([AuditEntry.from_row(r) for r in rows], int(total), page, pages)
    rows = [r for r in db.query(f"{select(AUDIT_COLUMNS, 'audit')} WHERE {where}"
                                " ORDER BY id DESC LIMIT 100000", params)
            if visible(str(r[AUDIT_COLUMNS.index('target')]))]
    pages = max(1, -(-len(rows) // per_page))
    page = min(max(1, page), pages)
    chosen = rows[(page - 1) * per_page: page * per_page]
    return AuditPage([AuditEntry.from_row(r) for r in chosen], len(rows), page, pages)


def node_history(db: Reads, node: str, actions: tuple[str, ...], limit: int = 50
                 ) -> list[AuditEntry]:
    """The audit entries of `node` with one of `actions`, newest first."""
    marks = ",".join("?" * len(actions))
    rows = db.query(f"{select(AUDIT_COLUMNS, 'audit')} WHERE target = ? COLLATE NOCASE"
                    f" AND action IN ({marks}) ORDER BY id DESC LIMIT ?",
                    (node, *actions, limit))
    return [AuditEntry.from_row(r) for r in rows]
