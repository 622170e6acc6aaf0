"""The console's page layout and HTML escaping: every page is built from these.

Everything that came from a user, a device or the registry goes through `esc`
(or `attr`); pages are plain strings put together on the server, readable
without JavaScript.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from urllib.parse import quote, urlencode

from attrs import frozen


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def url_part(value: str) -> str:
    return quote(value, safe="")


def query(**params: object) -> str:
    kept = {k: str(v) for k, v in params.items() if v not in (None, "")}
    return ("?" + urlencode(kept)) if kept else ""


def when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"


@frozen
class Viewer:
    """Who the page is for (None: nobody signed in)."""

    user: str
    admin: bool
    csrf: str


def csrf_field(viewer: Viewer) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(viewer.csrf)}">'


def post_button(viewer: Viewer, action: str, label: str, cls: str = "",
                fields: Iterable[tuple[str, str]] = (), confirm: str | None = None) -> str:
    """A one-button form that POSTs to `action` with the CSRF token."""
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">'
                     for k, v in fields)
    data = f' data-confirm="{esc(confirm)}"' if confirm else ""
    return (f'<form method="post" action="{esc(action)}" class="inline"{data}>'
            f'{csrf_field(viewer)}{hidden}<button type="submit" class="{esc(cls)}">'
            f'{esc(label)}</button></form>')


def page(title: str, body: str, viewer: Viewer | None = None, scripts: Iterable[str] = ()
         ) -> bytes:
    nav = ""
    if viewer is not None:
        role = " (admin)" if viewer.admin else ""
        nav = (f'<nav><a href="/nodes">Nodes</a><a href="/audit">Audit</a>'
               f'<span class="who">{esc(viewer.user)}{role}</span>'
               f'{post_button(viewer, "/signout", "Sign out", "link")}</nav>')
    tags = "".join(f'<script src="{esc(s)}" defer></script>' for s in scripts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)} · callhomehub</title>'
            f'<link rel="stylesheet" href="/static/console.css">{tags}</head>'
            f'<body><header><a class="brand" href="/">callhomehub</a>{nav}</header>'
            f'<main>{body}</main></body></html>').encode()


def error_page(code: int, title: str, message: str, viewer: Viewer | None = None) -> bytes:
    back = '<p><a href="/">Back to the console</a></p>'
    return page(f"{code} {title}", f'<h1>{code} {esc(title)}</h1>'
                f'<p class="error">{esc(message)}</p>{back}', viewer)


def table(head: Iterable[str], rows: Iterable[str], cls: str = "", id_: str = "") -> str:
    ident = f' id="{esc(id_)}"' if id_ else ""
    heads = "".join(f"<th>{esc(h)}</th>" for h in head)
    return (f'<table class="{esc(cls)}"{ident}><thead><tr>{heads}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def pager(path: str, page_no: int, pages: int, **params: object) -> str:
    if pages <= 1:
        return ""
    links = []
    if page_no > 1:
        links.append(f'<a href="{esc(path + query(**params, page=page_no - 1))}">'
                     '&larr; previous</a>')
    links.append(f"<span>page {page_no} of {pages}</span>")
    if page_no < pages:
        links.append(f'<a href="{esc(path + query(**params, page=page_no + 1))}">'
                     'next &rarr;</a>')
    return f'<p class="pager">{" ".join(links)}</p>'
