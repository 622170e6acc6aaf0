# A hub (`twistd callhomehub` with the options in $CALLHOMEHUB_ARGS, a JSON list) plus a bare
# web Site for the web terminal, on loopback, until the console's sign-in is wired in:
#   /as/USER/nodes/NAME/terminal[/socket]   the terminal as operator USER (no sign-in)
#   /static/...                             hub/web/static (xterm.js under vendor/)
# Run: CALLHOMEHUB_ARGS='["--data", "DIR"]' twistd -n --pidfile= --logfile LOG -y THIS
# Used by tests/test_web_terminal_e2e.py and bench/web_terminal.py.
import json
import os
from pathlib import Path

from twisted.application import service
from twisted.internet import reactor
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site
from twisted.web.static import File

import hub.web
from hub.access.reach import OperatorReach
from hub.app.service import ListenerService, Options, makeService
from hub.rules.logins import OperatorLogin
from hub.web.terminal import terminal_resource


class AsOperator(Resource):
    def __init__(self, top):
        Resource.__init__(self)
        self.top = top

    def getChild(self, user, request):
        # /as/USER/nodes/NAME/terminal...
        rest = request.postpath
        if len(rest) < 3 or rest[0] != b"nodes" or rest[2] != b"terminal":
            return NoResource()
        node = rest[1].decode()
        request.postpath = rest[3:]
        request.prepath += rest[:3]
        reach = OperatorReach(self.top.hub.gateway_needs(), OperatorLogin(user.decode()),
                              lambda: request.getClientAddress().host)
        page = terminal_resource(reach, node)
        if not request.postpath:
            return page
        child = request.postpath.pop(0)
        request.prepath.append(child)
        return page.getChild(child, request)


args = json.loads(os.environ["CALLHOMEHUB_ARGS"])
options = Options()
options.parseOptions(args)
top = makeService(options, reactor)
root = Resource()
root.putChild(b"as", AsOperator(top))
root.putChild(b"static", File(str(Path(hub.web.__file__).parent / "static")))
ListenerService("web-terminal", "tcp:0:interface=127.0.0.1", Site(root), reactor
                ).setServiceParent(top)
application = service.Application("callhomehub-web-terminal")
top.setServiceParent(application)
