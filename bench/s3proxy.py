"""s3proxy.py: a counting (and optionally delaying) HTTP proxy on 127.0.0.1 in front of an S3 server.

Used by bench.py: every S3 client of a benchmark run (rclone copy, rclone archive, the three
scripts) talks to the hub server through this proxy, which counts the requests by method and
status, and can add a fixed delay to every request to emulate a distant bucket.

It runs in its own process (so the benchmark's samplers do not share its interpreter lock):

    python bench/s3proxy.py --upstream http://127.0.0.1:PORT [--delay-ms N]

prints ``PORT <n>`` on its first line once it listens, then serves until SIGTERM/SIGINT.
``GET /__bench__/stats`` returns the counters as JSON (not counted, not delayed; no S3 bucket
can be named ``__bench__``).

Forwarding rules: the Host header and every end-to-end header are passed unchanged (the
clients' SigV4 signatures cover Host), ``Expect: 100-continue`` is answered by the proxy
(``protocol_version`` HTTP/1.1) and not forwarded, request and response bodies are streamed
(a chunked request body is de-chunked first), HEAD responses keep the upstream
Content-Length, and upstream connections are kept alive per client connection.
Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHUNK = 256 * 1024
BUFFER_LIMIT = 1 << 20          # request bodies up to this size are buffered (retry on a stale upstream)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
              "upgrade", "expect", "proxy-authenticate", "proxy-authorization"}
CONTROL = "/__bench__/"


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0
        self.by_method: dict[str, int] = {}
        self.by_status: dict[str, int] = {}
        self.bytes_in = 0       # request bodies forwarded upstream
        self.bytes_out = 0      # response bodies returned to clients
        self.errors = 0         # upstream failures answered with 502
        self.aborted = 0        # answers not delivered whole (a side closed the connection)
        self.active = 0
        self.max_active = 0

    def begin(self, method: str) -> None:
        with self.lock:
            self.total += 1
            self.by_method[method] = self.by_method.get(method, 0) + 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def end(self, status: int | None, sent_in: int, sent_out: int, *, aborted: bool = False) -> None:
        with self.lock:
            if aborted:
                self.aborted += 1
            self.active -= 1
            key = str(status) if status is not None else "error"
            self.by_status[key] = self.by_status.get(key, 0) + 1
            self.bytes_in += sent_in
            self.bytes_out += sent_out
            if status is None:
                self.errors += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"total": self.total, "by_method": dict(self.by_method),
                    "by_status": dict(self.by_status), "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out, "errors": self.errors, "aborted": self.aborted,
                    "max_active": self.max_active}


class UpstreamError(Exception):
    pass


def make_handler(upstream: tuple[str, int], delay_s: float, stats: Stats, request_log=None):
    host, port = upstream
    log_lock = threading.Lock()

    def note(method: str, path: str, status, sent_in: int, sent_out: int, started: float) -> None:
        if request_log is None:
            return
        line = (f"{time.time():.3f} {time.monotonic() - started:.4f} {method} {status} {sent_in} {sent_out} "
                f"{path}\n")
        with log_lock:
            request_log.write(line)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "bench-s3proxy"
        timeout = 300
        _conn: http.client.HTTPConnection | None = None

        def log_message(self, *args) -> None:  # quiet
            return

        def setup(self) -> None:
            super().setup()
            # headers and body go out in separate writes: without this, Nagle's algorithm and the
            # client's delayed ACK add about 40 ms to many responses
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        # --- upstream connection, one per client connection (kept alive)
        def _upstream(self, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
            if fresh and self._conn is not None:
                self._conn.close()
                self._conn = None
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(host, port, timeout=600)
                self._conn.connect()
                self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self._conn, reused

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        # --- request body
        def _read_chunked(self) -> bytes:
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)  # CRLF after the chunk

        def _send_upstream(self, conn: http.client.HTTPConnection, headers: list[tuple[str, str]],
                           body: bytes | None, length: int) -> None:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            if body is not None or length:
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if body is not None:
                if body:
                    conn.send(body)
                return
            left = length
            while left > 0:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    raise ConnectionError("client closed the connection in the middle of a request body")
                conn.send(chunk)
                left -= len(chunk)

        # --- the one handler for every method
        def _handle(self) -> None:
            if self.path.startswith(CONTROL):
                self._control()
                return
            stats.begin(self.command)
            started = time.monotonic()
            status: int | None = None
            sent_in = sent_out = 0
            try:
                if delay_s:
                    time.sleep(delay_s)
                headers = [(k, v) for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
                body: bytes | None = None
                te = (self.headers.get("Transfer-Encoding") or "").lower()
                if "chunked" in te:
                    body = self._read_chunked()
                    length = len(body)
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length <= BUFFER_LIMIT:
                        body = self.rfile.read(length) if length else (b"" if "Content-Length" in self.headers
                                                                        else None)
                sent_in = length
                conn, reused = self._upstream()
                try:
                    self._send_upstream(conn, headers, body, length)
                    resp = conn.getresponse()
                except (http.client.HTTPException, ConnectionError, OSError):
                    if not reused or body is None:
                        raise
                    conn, _ = self._upstream(fresh=True)   # stale kept-alive connection: once more
                    self._send_upstream(conn, headers, body, length)
                    resp = conn.getresponse()
                status = resp.status
            except (http.client.HTTPException, ConnectionError, OSError, ValueError) as exc:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                status = None
                self.close_connection = True
                try:
                    payload = f"bench proxy: upstream failed: {exc!r}".encode()
                    self.send_response_only(502, "Bad Gateway")
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass
                stats.end(None, sent_in, 0)
                note(self.command, self.path, 502, sent_in, 0, started)
                return
            try:
                sent_out = self._relay(resp)
                aborted = False
                if resp.will_close:
                    self._conn.close()
                    self._conn = None
            except (http.client.HTTPException, ConnectionError, OSError, ValueError):
                # the client went away in the middle of the answer (a reader that stops early, such
                # as rclone archive extract), or the server did: end both connections
                aborted = True
                self.close_connection = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            stats.end(status, sent_in, sent_out, aborted=aborted)
            note(self.command, self.path, f"{status}{'-cut' if aborted else ''}", sent_in, sent_out, started)

        def _relay(self, resp: http.client.HTTPResponse) -> int:
            upstream_length = resp.getheader("Content-Length")
            no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            data: bytes | None = None
            if not no_body and upstream_length is None:
                data = resp.read()   # chunked or until close: small XML answers; buffer them
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() in HOP_BY_HOP or k.lower() == "content-length":
                    continue
                self.send_header(k, v)
            if no_body:
                if upstream_length is not None:
                    self.send_header("Content-Length", upstream_length)
                self.end_headers()
                resp.read()
                return 0
            if data is not None:
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return len(data)
            self.send_header("Content-Length", upstream_length)
            self.end_headers()
            sent = 0
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
            return sent

        def _control(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if self.path.startswith(CONTROL + "stats"):
                payload = json.dumps(stats.snapshot()).encode()
                code = 200
            else:
                payload, code = b"unknown control path", 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


def serve(upstream_url: str, delay_ms: float, port: int = 0, request_log=None) -> tuple[Server, Stats]:
    parts = urlsplit(upstream_url)
    stats = Stats()
    server = Server(("127.0.0.1", port), make_handler((parts.hostname, parts.port or 80),
                                                       delay_ms / 1000.0, stats, request_log))
    return server, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="counting/delaying HTTP proxy in front of an S3 server")
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the S3 server")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="added to every request [0]")
    ap.add_argument("--port", type=int, default=0, help="port to listen on [a free one]")
    ap.add_argument("--request-log", default=None,
                    help="append one line per request: unix time, seconds taken, method, status, "
                         "bytes in, bytes out, path")
    args = ap.parse_args(argv)
    request_log = open(args.request_log, "a", buffering=1, encoding="utf-8") if args.request_log else None
    server, _stats = serve(args.upstream, args.delay_ms, args.port, request_log)

    def stop(_signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if request_log is not None:
            request_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
