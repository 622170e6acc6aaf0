"""A device's own web server for the proxy tests: `python device_web.py` prints its port.

/            a page                  /redirect  302 to /login (path-absolute)
/absolute    302 to http://localhost:PORT/login      /login  a page
/cookies     sets sid (Path=/) and tries to set the console's cookie
/echo        the request line and headers it got, as text
/big?n=N     N bytes of a fixed pattern (for download tests)
"""

from __future__ import annotations

import hashlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

BLOCK = hashlib.sha256(b"callhomehub").digest() * 32768  # 1 MiB


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send(self, code: int, body: bytes, *headers: tuple[str, str]) -> None:
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/":
            self.send(200, b"<html><body>device home</body></html>",
                      ("Content-Type", "text/html"))
        elif url.path == "/redirect":
            self.send(302, b"", ("Location", "/login"))
        elif url.path == "/absolute":
            host = self.headers.get("Host", "")
            self.send(302, b"", ("Location", f"http://{host}/login"))
        elif url.path == "/login":
            self.send(200, b"login page", ("Content-Type", "text/plain"))
        elif url.path == "/cookies":
            self.send(200, b"cookies set", ("Set-Cookie", "sid=device-1; Path=/; HttpOnly"),
                      ("Set-Cookie", "__Host-chh-session=forged; Path=/; Secure"))
        elif url.path == "/echo":
            text = self.requestline + "\n" + str(self.headers)
            self.send(200, text.encode(), ("Content-Type", "text/plain"))
        elif url.path == "/big":
            n = int(parse_qs(url.query)["n"][0])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                chunk = BLOCK[:min(n, len(BLOCK))]
                self.wfile.write(chunk)
                n -= len(chunk)
        else:
            self.send(404, b"no such page")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.send(200, b"got " + body, ("Content-Type", "text/plain"))


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
