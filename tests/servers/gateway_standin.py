#!/usr/bin/env python3
"""A REAL HTTP/1.1 server standing in for the chat gateway in sensor tests (not a double of hearth or
of a runtime): keep-alive connections, `POST /echo?reply=N` reads the body and answers N bytes,
`GET /health` answers ok. Prints "listening <port>" once it accepts connections."""
import argparse
import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def _reply(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(b"ok")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        remaining = n
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
        reply = 0
        if "reply=" in self.path:
            reply = int(self.path.split("reply=", 1)[1].split("&", 1)[0])
        self._reply(b"r" * reply)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print(f"listening {a.port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
