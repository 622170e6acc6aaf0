"""Denial of service before login, against a real hub on loopback.

    .venv/bin/python bench/preauth_flood.py [--flood N] [--seconds S] [--pipeline M]
                                            [--hub-source REV] [--json FILE]

Flood: N silent TCP connections to the hub's SSH port from 127.0.0.2 (the
client socket bound to it), re-opened as the hub drops them, for S seconds at
most and 100*N connections at most. Meanwhile a registered device logs in with
its key (the real `ssh`) from 127.0.0.3 and from 127.0.0.2 (the flooded
address, where the device had logged in before the flood: a CGNAT address
shared by devices and an attacker); each login is timed.

Pipeline: one connection (a Conch client in a child process) sends M
`password` requests without waiting for answers; the hub's CPU time (all its
threads: bcrypt runs on the thread pool) is read from /proc over the burst and
the 20 s after, and the log's `failed password` lines are counted.

Loopback only; every process it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import errno
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import SSH, Hub, client_options, cpu_seconds, make_key, vm_rss_kib
from runner import add_source_option, install_sigterm, use_hub_source, write_doc

FLOOD_SOURCE = "127.0.0.2"
OTHER_SOURCE = "127.0.0.3"


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class Flood(threading.Thread):
    """Keeps up to `target` silent connections open from `source`."""

    def __init__(self, port: int, source: str, target: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.target = port, source, target
        self.deadline = time.monotonic() + seconds
        self.max_opens = 100 * target
        self.opens = 0
        self.dropped = 0
        self.open_now = 0
        self.stop = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        socks: set[socket.socket] = set()
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                while len(socks) < self.target and self.opens < self.max_opens:
                    s = socket.socket()
                    s.setblocking(False)
                    try:
                        s.bind((self.source, 0))
                        err = s.connect_ex(("127.0.0.1", self.port))
                    except OSError:
                        s.close()
                        break
                    self.opens += 1
                    if err not in (0, errno.EINPROGRESS):
                        s.close()
                        self.dropped += 1
                        continue
                    socks.add(s)
                    sel.register(s, selectors.EVENT_READ)
                self.open_now = len(socks)
                for key, _ in sel.select(0.05):
                    s = key.fileobj  # type: ignore[assignment]
                    try:
                        gone = s.recv(4096) == b""  # the hub's version line is ignored
                    except OSError:
                        gone = True
                    if gone:
                        sel.unregister(s)
                        s.close()
                        socks.discard(s)
                        self.dropped += 1
                if self.opens >= self.max_opens and not socks:
                    break
        finally:
            for s in socks:
                s.close()
            sel.close()
            self.open_now = 0


def key_login(port: int, key: Path, source: str) -> tuple[bool, float]:
    """A device's key login with the real ssh from `source`: (logged in, seconds)."""
    start = time.monotonic()
    result = subprocess.run(
        [SSH, *client_options(port), "-b", source, "-o", "BatchMode=yes",
         "-o", "PasswordAuthentication=no", "-i", str(key), "cms@127.0.0.1", "true"],
        capture_output=True, timeout=30)
    took = time.monotonic() - start
    return b"does not have shell access" in result.stderr, took


def probe(hub: Hub) -> dict[str, int]:
    assert hub.proc is not None
    return {"fds": open_fds(hub.proc.pid), "rss_kib": vm_rss_kib(hub.proc.pid)}


def run_flood(hub: Hub, key: Path, count: int, seconds: float,
              logins_each: int) -> dict[str, object]:
    before = probe(hub)
    ok, _ = key_login(hub.port, key, FLOOD_SOURCE)  # the device source's earlier login
    flood = Flood(hub.port, FLOOD_SOURCE, count, seconds)
    flood.start()
    time.sleep(min(3.0, seconds / 4))  # let the flood reach its size
    logins = []
    during = probe(hub)
    for source in (OTHER_SOURCE, FLOOD_SOURCE) * logins_each:
        if not flood.is_alive():
            break
        logged_in, took = key_login(hub.port, key, source)
        logins.append({"source": source, "ok": logged_in, "seconds": round(took, 3),
                       "flood_open": flood.open_now})
    during_end = probe(hub)
    opens_during_logins = flood.opens
    flood.stop.set()
    flood.join(30)
    time.sleep(1)
    summary = {src: f"{sum(x['ok'] for x in logins if x['source'] == src)}"
                    f"/{sum(x['source'] == src for x in logins)} in, max "
                    f"{max((x['seconds'] for x in logins if x['source'] == src), default=0)} s"
               for src in (OTHER_SOURCE, FLOOD_SOURCE)}
    return {"flood_connections": count, "device_source_login_before": ok,
            "summary": summary, "opens_until_logins_done": opens_during_logins,
            "opens": flood.opens, "dropped_by_hub": flood.dropped, "logins": logins,
            "before": before, "during": during, "during_end": during_end, "after": probe(hub),
            "refusal_log_lines": hub.log_text().count(f"connection from {FLOOD_SOURCE}: "),
            "tracebacks": hub.log_text().count("Traceback")}


PIPELINE_CLIENT = r"""
import sys
from twisted.conch.ssh import transport
from twisted.conch.ssh.common import NS
from twisted.internet import defer, protocol, reactor
from hub.ssh.testing import ModernClientTransport

port, count = int(sys.argv[1]), int(sys.argv[2])

class Pipeline(ModernClientTransport):
    def verifyHostKey(self, blob, fp):
        return defer.succeed(True)
    def connectionSecure(self):
        self.sendPacket(transport.MSG_SERVICE_REQUEST, NS(b"ssh-userauth"))
        for i in range(count):
            self.sendPacket(50, NS(b"cms") + NS(b"ssh-connection") + NS(b"password")
                            + b"\0" + NS(b"wrong-%d" % i))
        print("sent", count, flush=True)
    def ssh_SERVICE_ACCEPT(self, packet):
        pass
    def dispatchMessage(self, num, payload):
        if num < 50:  # transport layer (kex, disconnect); answers to user auth are ignored
            super().dispatchMessage(num, payload)
    def connectionLost(self, reason):
        print("closed:", reason.getErrorMessage(), flush=True)
        if reactor.running:
            reactor.stop()

f = protocol.ClientFactory()
f.protocol = Pipeline
reactor.connectTCP("127.0.0.1", port, f, bindAddress=("127.0.0.4", 0))
reactor.callLater(20, reactor.stop)
reactor.run()
"""


def run_pipeline(hub: Hub, count: int, window: float = 20.0) -> dict[str, object]:
    assert hub.proc is not None
    pid = hub.proc.pid
    failed_before = hub.log_text().count("failed password")
    cpu0 = cpu_seconds(pid)
    start = time.monotonic()
    client = subprocess.run([sys.executable, "-c", PIPELINE_CLIENT, str(hub.port), str(count)],
                            capture_output=True, timeout=60)
    client_seconds = time.monotonic() - start
    cpu_client = cpu_seconds(pid) - cpu0
    time.sleep(window)
    return {"requests": count, "client": client.stdout.decode().split("\n")[:2],
            **({} if b"sent" in client.stdout
               else {"client_errors": client.stderr.decode()[-1500:]}),
            "client_seconds": round(client_seconds, 2),
            "hub_cpu_during_connection": round(cpu_client, 2),
            f"hub_cpu_including_{window:g}s_after": round(cpu_seconds(pid) - cpu0, 2),
            "failed_password_lines": hub.log_text().count("failed password") - failed_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=1000, metavar="N")
    parser.add_argument("--seconds", type=float, default=40.0, metavar="S")
    parser.add_argument("--logins", type=int, default=5, metavar="K",
                        help="key logins from each source during the flood")
    parser.add_argument("--pipeline", type=int, default=800, metavar="M",
                        help="password requests on one connection (0: skip)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("-v", action="store_true", help="print the end of the hub log")
    add_source_option(parser)
    args = parser.parse_args()
    install_sigterm()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.flood + 256)), hard))
    with tempfile.TemporaryDirectory(prefix="preauth-") as tmp:
        work = Path(tmp)
        source = use_hub_source(args.hub_source, work)
        hub = Hub(work)
        try:
            hub.start()
            key = make_key(work / "device", "bench")
            hub.register(key, work)
            results: dict[str, object] = {**source}
            if args.flood:
                results["flood"] = run_flood(hub, key, args.flood, args.seconds, args.logins)
                print("flood:", results["flood"], flush=True)
            if args.pipeline:
                results["pipeline"] = run_pipeline(hub, args.pipeline)
                print("pipeline:", results["pipeline"], flush=True)
            if args.v:
                print("\n".join(line for line in hub.log_text().splitlines()
                                if FLOOD_SOURCE in line)[-3000:])
        finally:
            hub.close()
    if args.json:
        write_doc(args.json, "preauth_flood", results)


if __name__ == "__main__":
    main()
