"""Static files under /static/ from hub/web/static (and its vendor/ folder).

Each path segment is checked before it touches the file system: no `..`, no
`.`-files, no separators that a percent-encoded segment could smuggle in. The
files are small (our CSS and scripts, a terminal library): each is read and sent
in one piece.
"""

from __future__ import annotations

import mimetypes
import re
from typing import Any

from twisted.python.filepath import FilePath, InsecurePath
from twisted.web.resource import Resource

from hub.web.errors import ErrorResource

_SEGMENT = re.compile(rb"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*$")


def static_root() -> FilePath[str]:
    from importlib.resources import files

    return FilePath(str(files("hub.web") / "static"))


class StaticFiles(Resource):
    """A folder of our own files; a file is served by Twisted's `static.File`."""

    def __init__(self, folder: FilePath[str] | None = None) -> None:
        super().__init__()
        self.folder = folder or static_root()

    def getChild(self, path: bytes, request: Any) -> Resource:
        if not _SEGMENT.match(path) or b".." in path:
            return ErrorResource(404, "no such file")
        try:
            child = self.folder.child(path.decode("ascii"))
        except InsecurePath:
            return ErrorResource(404, "no such file")
        if child.isdir():
            return StaticFiles(child)
        if not child.isfile():
            return ErrorResource(404, "no such file")
        return StaticFile(child)

    def render(self, request: Any) -> bytes:
        return ErrorResource(404, "no such file").render(request)


class StaticFile(Resource):
    isLeaf = True

    def __init__(self, path: FilePath[str]) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request: Any) -> bytes:
        if request.postpath:
            return ErrorResource(404, "no such file").render(request)
        kind = mimetypes.guess_type(self.path.basename())[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            kind += "; charset=utf-8"
        request.setHeader(b"content-type", kind.encode())
        request.setHeader(b"cache-control", b"no-cache")
        return self.path.getContent()
