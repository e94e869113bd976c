"""A small HTTP proxy on 127.0.0.1 that injects S3 faults in front of a real S3 server.

A share of requests (``rate``) gets one of: 503 SlowDown, 500 InternalError, 429
TooManyRequests, a connection dropped before the request reaches the server, or a
connection dropped after the server applied it (the client never hears the answer).
``delay_s`` adds latency to every request, to emulate a distant bucket. Counts of
requests and faults are kept for the tests.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "throttle", "drop-before", "drop-after")

_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "throttle": (429, "TooManyRequests", "Too many requests."),
}


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 1, delay_s: float = 0.0,
                 faults: tuple[str, ...] = FAULTS, corrupt_paths: str | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.delay_s = delay_s
        self.faults = faults
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.injected: dict[str, int] = {f: 0 for f in FAULTS}
        self.by_method: dict[str, int] = {}
        self.corrupt_paths = corrupt_paths  # flip one byte of PUT bodies whose path contains this
        self.corrupted = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                return

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if (proxy.corrupt_paths and self.command == "PUT" and proxy.corrupt_paths in self.path
                        and len(body) > 100):
                    body = body[:len(body) // 2] + bytes([body[len(body) // 2] ^ 0x01]) + body[len(body) // 2 + 1:]
                    with proxy.lock:
                        proxy.corrupted += 1
                fault = proxy._draw(self.command)
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if fault == "drop-before":
                    self._drop()
                    return
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "drop-after":
                    self._drop()
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self, method: str) -> str | None:
        with self.lock:
            self.requests += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            if self.rate and self.rng.random() < self.rate:
                fault = self.rng.choice(self.faults)
                self.injected[fault] += 1
                return fault
        return None

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
