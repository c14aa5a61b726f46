#!/usr/bin/env python3
"""FAULT-INJECTION DOUBLE, not a runtime: a tiny HTTP server used through hearth's `command` runtime
to produce failures a real llama-server cannot produce on demand.

Modes (--mode):
  never-ready     /health always answers 503 (tests start_timeout).
  ignore-sigterm  ready at once; ignores SIGTERM and spawns a grandchild (also ignoring SIGTERM) so that
                  hearth must SIGKILL the whole process group after stop_timeout.
  drop-requests   ready at once; every POST gets its connection closed without a response (tests 502).
  escape          ready at once; forks a grandchild that leaves the process group and the session
                  (setsid) and ignores SIGTERM: only a cgroup-wide kill reaches it. Its command line
                  carries "fault-injection-escaped-grandchild" and the tag.
  alloc           allocates and touches --alloc-mb MB before it listens (a runtime that blows its
                  memory limit while loading), then serves like the default.
  alloc-on-request  ready at once; every POST allocates and touches --alloc-mb MB before answering
                  (a runtime that blows its memory limit while serving).

Every argument after the known ones is ignored, so the test can tag the command line (e.g. with its
tmp_path) to find leaked processes. It prints a few recognisable log lines to stderr.
"""
import argparse
import http.server
import os
import signal
import socket
import subprocess
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", required=True, choices=["never-ready", "ignore-sigterm", "drop-requests", "escape", "alloc", "alloc-on-request"])
    p.add_argument("--alloc-mb", type=int, default=0)
    p.add_argument("--tag", default="")
    args, _ = p.parse_known_args()

    def log(msg):
        print(f"fault-injection[{args.mode}] {msg}", file=sys.stderr, flush=True)

    if args.mode == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # A grandchild in the same process group that also ignores SIGTERM.
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)",
             "fault-injection-grandchild", args.tag])
        log(f"grandchild pid {child.pid}")

    if args.mode == "alloc":
        log(f"allocating {args.alloc_mb} MB")
        hog = bytearray(b"\x01") * (args.alloc_mb * 1024 * 1024)  # written, so resident
        log(f"allocated {len(hog) // (1024 * 1024)} MB")

    if args.mode == "escape":
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)",
             "fault-injection-escaped-grandchild", args.tag],
            start_new_session=True)
        log(f"escaped grandchild pid {child.pid} (own session and process group)")

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            log(fmt % a)

        def _send(self, code, body):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.startswith("/health"):
                if args.mode == "never-ready":
                    log("FAULT-INJECTION-MARKER still loading, never ready")
                    self._send(503, '{"error":{"code":503,"message":"Loading model"}}')
                else:
                    self._send(200, '{"status":"ok"}')
            elif self.path.startswith("/v1/models"):
                self._send(200, '{"object":"list","data":[{"id":"fake","object":"model"}]}')
            else:
                self._send(404, '{"error":"not found"}')

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            if args.mode == "alloc-on-request":
                log(f"FAULT-INJECTION-MARKER allocating {args.alloc_mb} MB for a request")
                hog = bytearray(b"\x01") * (args.alloc_mb * 1024 * 1024)
                log(f"allocated {len(hog) // (1024 * 1024)} MB")
            if args.mode == "drop-requests":
                log("FAULT-INJECTION-MARKER dropping connection")
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.connection.close()
                self.close_connection = True
                return
            self._send(200, '{"choices":[{"index":0,"message":{"role":"assistant","content":"fake"},'
                            '"finish_reason":"stop"}],"object":"chat.completion"}')

    srv = http.server.ThreadingHTTPServer((args.host, args.port), H)
    log(f"FAULT-INJECTION-MARKER listening on {args.host}:{args.port} pid {os.getpid()}")
    srv.serve_forever()


if __name__ == "__main__":
    main()
