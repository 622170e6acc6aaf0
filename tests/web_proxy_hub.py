"""A real hub in its own process with the device web UI proxy on a loopback Site.

`python tests/web_proxy_hub.py DATA OPERATOR` builds the hub as `twistd callhomehub`
does (registry, tunnels, the SSH listener on a free loopback port) and serves
`/nodes/NAME/web/` for OPERATOR on another free loopback port, standing in for the
console's router until it is merged. It prints `ssh PORT` and `web PORT`, then runs
until SIGTERM. Used by tests/test_web_proxy_e2e.py and bench/web_proxy.py.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import endpoints, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import Site

from hub.access.reach import OperatorReach
from hub.app.config import build_config
from hub.app.service import build_hub, build_ssh_factory
from hub.rules.logins import OperatorLogin
from hub.web.proxy import BrowseAudit, device_web_resource


class Node(Resource):
    def __init__(self, hub: Any, reach: OperatorReach, name: str, browse: BrowseAudit) -> None:
        super().__init__()
        self.args = (hub, reach, name, browse)

    def getChild(self, path: bytes, request: Any) -> Any:
        hub, reach, name, browse = self.args
        if path != b"web":
            return Resource.getChild(self, path, request)
        return device_web_resource(reach, name, settings=hub.config.web_proxy,
                                   clock=hub.clock, browse=browse)


class Nodes(Resource):
    def __init__(self, hub: Any, reach: OperatorReach) -> None:
        super().__init__()
        self.hub, self.reach = hub, reach
        self.browse = BrowseAudit(hub.clock, hub.config.web_proxy.audit_interval)

    def getChild(self, path: bytes, request: Any) -> Any:
        return Node(self.hub, self.reach, path.decode("utf-8", "replace"), self.browse)


def main(data: str, operator: str) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(open(f"{data}/hub.log", "a"))],
                                   redirectStandardIO=False)
    config = build_config({"data": data, "ssh": "tcp:0:interface=127.0.0.1",
                           "keepalive": "0"})
    hub = build_hub(config, reactor)
    root, nodes = Resource(), None
    reach = OperatorReach(hub.gateway_needs(), OperatorLogin(operator), lambda: "127.0.0.1")
    nodes = Nodes(hub, reach)
    root.putChild(b"nodes", nodes)

    def listening(what: str) -> Any:
        def say(port: Any) -> None:
            print(what, port.getHost().port, flush=True)
        return say

    endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        build_ssh_factory(hub)).addCallback(listening("ssh"))
    endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Site(root)).addCallback(listening("web"))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
