"""The audit log page: filters (actor, action, target, time range) and paging."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from hub.store.registry import Registry
from hub.web.guard import SignedIn, SignedInPage
from hub.web.html import esc, page, pager, table, when
from hub.web.pages import arg, int_arg
from hub.web.queries import AuditFilter, audit_page, visible_filter
from hub.web.queries import AuditPage as AuditEntries

PER_PAGE = 100


def parse_day_time(text: str) -> float | None:
    """`YYYY-MM-DD` or `YYYY-MM-DDTHH:MM` (UTC, as the page shows times), else None."""
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    return None


def read_audit_page(registry: Registry, f: AuditFilter, page_no: int, per_page: int,
                    visible: Callable[[str], bool] | None) -> AuditEntries:
    """In the registry thread: one page of the log (`queries.audit_page`)."""
    return audit_page(registry, f, page_no, per_page, visible)


class AuditPage(SignedInPage):
    def show(self, request: Any, who: SignedIn) -> defer.Deferred[bytes]:
        fields = {k: arg(request, k.encode(), 100) for k in ("actor", "action", "target",
                                                              "since", "until")}
        f = AuditFilter(fields["actor"], fields["action"], fields["target"],
                        parse_day_time(fields["since"]), parse_day_time(fields["until"]))
        return self.needs.calls.call(
            read_audit_page, f, int_arg(request, b"page"), PER_PAGE,
            visible_filter(who.user.admin, who.user.allow)).addCallback(
            self._page, request, who, fields)

    def _page(self, result: AuditEntries, request: Any, who: SignedIn,
              fields: dict[str, str]) -> bytes:
        inputs = "".join(
            f'<label>{esc(k)} <input name="{esc(k)}" value="{esc(v)}"'
            f'{" placeholder=YYYY-MM-DD" if k in ("since", "until") else ""}></label>'
            for k, v in fields.items())
        rows = [f"<tr><td>{esc(when(e.time))}</td><td>{esc(e.actor)}</td>"
                f"<td>{esc(e.action)}</td><td>{esc(e.target)}</td><td>{esc(e.detail)}</td></tr>"
                for e in result.entries]
        note = "" if who.user.admin else (
            '<p class="hint">Entries about the nodes your grants allow.</p>')
        body = (f'<h1>Audit log</h1>{note}<form method="get" action="/audit" class="search">'
                f'{inputs}<button type="submit">Filter</button></form>'
                f'<p class="count">{result.total} entries</p>'
                f'{table(("When (UTC)", "Actor", "Action", "Target", "Detail"), rows, "audit")}'
                f'{pager("/audit", result.page, result.pages, **fields)}')
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page("Audit", body, who.viewer)
