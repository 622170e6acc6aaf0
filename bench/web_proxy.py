"""Download throughput through the device web UI proxy against a direct connection
to the node's per-device (SDT) port, in the same run.

    .venv/bin/python bench/web_proxy.py [--size MiB] [--repeat N] [--json FILE]

One run starts `twistd callhomehub --web tcp:0:interface=127.0.0.1` with operator
alice signed in over HTTP (the Rig of tests/test_web_proxy_e2e.py), a device web
server (tests/device_web.py) and the device's real `ssh -R http:0:localhost:PORT`.
Each repeat downloads `--size` MiB of /big both ways, order flipped every repeat so
load from elsewhere hits both alike:

- proxy:  client -> hub's web console -> /nodes/r1/web/big -> tunnel -> device server
          (with alice's session cookie)
- direct: client -> hub's http port (the SDT port) -> tunnel -> device server

Both cross the same SSH tunnel; the difference is the proxy's HTTP client and
server in the hub. The median of the repeats is reported, MB/s = 10**6 bytes/s.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_web_proxy_e2e import Rig

from hub.store.registry import Registry


def download(port: int, path: str, size: int, cookie: str = "") -> float:
    """Seconds to GET `path` from 127.0.0.1:`port` (sending `cookie`, if any) and read
    all of its body."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = f"Cookie: {cookie}\r\n" if cookie else ""
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{sent}"
                     "Connection: close\r\n\r\n".encode())
        got = 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            got += len(data)
    elapsed = time.perf_counter() - start
    if got < size:
        raise SystemExit(f"{path} on port {port}: got {got} bytes of {size}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB per download")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    size = args.size * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(Path(tmp))
        try:
            rig.connect(rig.device_web_port)
            registry = Registry(str(rig.registry_path), now=time.time)
            sdt = registry.node("r1").forwards["http"]
            registry.close()
            runs: dict[str, list[float]] = {"proxy": [], "direct": []}
            ways = {"proxy": (rig.web_port, f"/nodes/r1/web/big?n={size}", size, rig.cookie()),
                    "direct": (sdt, f"/big?n={size}", size, "")}
            download(*ways["proxy"])  # warm up both paths
            download(*ways["direct"])
            for i in range(args.repeat):
                order = ["proxy", "direct"] if i % 2 == 0 else ["direct", "proxy"]
                for way in order:
                    runs[way].append(size / download(*ways[way]) / 1e6)
        finally:
            rig.close()
    result = {way: round(statistics.median(mbs), 1) for way, mbs in runs.items()}
    result["ratio"] = round(result["proxy"] / result["direct"], 3)
    result["size_mib"] = args.size
    result["repeat"] = args.repeat
    print(f"download {args.size} MiB, median of {args.repeat}: proxy {result['proxy']} MB/s, "
          f"direct to the SDT port {result['direct']} MB/s, ratio {result['ratio']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
