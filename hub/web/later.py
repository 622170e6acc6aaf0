"""Answering a request once its registry reads have come back from the registry thread.

twisted.web renders and finds children synchronously; the console's reads run in
the hub's registry thread (`WebNeeds.calls`) and answer with a Deferred. A page
returns `render_later(request, read, render)`; a path whose resource depends on
a read (the node named in the URL) is a `Later` leaf that resolves the rest of
the path once the read has answered.

The browser may go away meanwhile: then nothing is written. A failed read or
render is one log line and the console's 500 page (no traceback, no detail on
the page: the detail is in the log).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET

from hub.web.errors import send_error
from hub.web.html import Viewer

log = Logger()

T = TypeVar("T")
Body = bytes | None
FAILED = "The hub could not answer this request; the error is in its log."


def render_later(request: Any, answer: defer.Deferred[T],
                 render: Callable[[T], Body | defer.Deferred[Any]] | None = None,
                 viewer: Viewer | None = None) -> int:
    """Answer `request` once `answer` fires: with `render(result)` (or the result
    itself), a body, or None when the request has been answered already. Nothing
    is rendered or written once the client has gone."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def rendered(result: Any) -> Any:
        if gone or request.finished:
            return None
        return render(result) if render is not None else result

    def write(body: Body) -> None:
        if body is None or gone or request.finished:
            return
        # Framed as an answer returned at once would be (not chunked).
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()

    def failed(f: Failure) -> None:
        why = f.getErrorMessage() or repr(f.value)
        log.error("web: {method} {uri} failed: {why}",
                  method=request.method.decode("ascii", "replace"),
                  uri=request.uri.decode("ascii", "replace"), why=why)
        if gone or request.finished:
            return
        if getattr(request, "startedWriting", False):
            # Part of an answer is out: the browser sees it cut, not completed.
            request.loseConnection()
            return
        write(send_error(request, 500, FAILED, viewer))

    answer.addCallback(rendered).addCallbacks(write, failed)
    return NOT_DONE_YET


class Later(Resource):
    """A resource found by a read off the reactor (`find`): the rest of the path is
    resolved below it and rendered once the read has answered."""

    isLeaf = True

    def __init__(self, find: Callable[[Any], defer.Deferred[Any]]) -> None:
        super().__init__()
        self.find = find

    def render(self, request: Any) -> int:
        def show(resource: IResource) -> None:
            request.render(getChildForRequest(resource, request))

        return render_later(request, self.find(request), show)
