"""Notifications (issue 20): NOTIFY_URLS=json://127.0.0.1:PORT/ makes Apprise POST each notice to a
JSON webhook served here on loopback; the tests read what it received."""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sample_tree import make_tree
from test_quota import drive_at_its_limit

pytestmark = pytest.mark.e2e


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def hook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"json://127.0.0.1:{server.server_address[1]}/", server.received
    server.shutdown()
    server.server_close()


def titled(received: list, word: str) -> list[dict]:
    return [m for m in received if word in m["title"]]


def test_a_pipeline_tells_each_stage_done_and_the_migration_once(env, hook):
    url, received = hook
    make_tree(env.source, small_files=12)
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        proc = env.run(script, NOTIFY_URLS=url)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert url not in proc.stderr and "127.0.0.1:" not in proc.stderr.split("S3_ENDPOINT")[0]
    zipped = titled(received, "python_zipper.py: done")
    assert len(zipped) == 1 and zipped[0]["type"] == "success"
    assert " units (" in zipped[0]["message"] and "B in " in zipped[0]["message"], zipped[0]
    complete = titled(received, "migration restored and verified")
    assert len(complete) == 1 and " files in " in complete[0]["message"], received
    assert not titled(received, "python_unzipper.py: done"), "the completion says it: not twice"
    assert f"{env.prefix}_status/notified/g1-complete.json" in env.objects()
    # Run again: nothing to do, nothing told; the completion is told once.
    assert env.run("python_unzipper.py", NOTIFY_URLS=url).returncode == 0
    assert len(titled(received, "migration restored and verified")) == 1 and len(received) == 3, received


def test_a_partial_run_tells_what_failed_and_that_a_rerun_continues(env, hook):
    url, received = hook
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    os.remove(os.path.join(env.source, "Photos", "img_003.jpg"))
    proc = env.run("python_zipper.py", NOTIFY_URLS=url)
    assert proc.returncode == 3, proc.stderr[-3000:]
    [told] = received
    assert told["type"] == "warning" and "partly done" in told["title"]
    assert "A rerun continues" in told["message"] and "img_003.jpg" in told["message"], told


def test_a_quota_pause_tells_until_when(env, hook):
    url, received = hook
    env.via_rclone()
    make_tree(env.source, small_files=6)
    for script in ("master_mapper.py", "python_zipper.py"):
        assert env.run(script).returncode == 0
    shim, _calls = drive_at_its_limit(env.tmp, env.vars["RCLONE_BIN"])
    proc = env.run("python_unzipper.py", RCLONE_BIN=shim, NOTIFY_URLS=url)
    assert proc.returncode == 75, proc.stderr[-3000:]
    until = json.loads(env.get(f"{env.prefix}_pause/destination.json"))["retry_after"]
    [told] = received
    # Two parts in flight hit the quota at once: each worker's pause may differ by milliseconds.
    assert told["title"].startswith(f"python_unzipper.py: paused until {until[:16]}"), told
    assert "provider quota" in told["message"] and "Run again after that" in told["message"]


def test_an_unreachable_url_is_logged_and_changes_no_exit_code(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens
    make_tree(env.source, small_files=4)
    proc = env.run("master_mapper.py", NOTIFY_URLS=f"json://someone:s3cr3t-token@127.0.0.1:{port}/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not accepted by json" in proc.stderr
    assert "s3cr3t-token" not in proc.stderr and "s3cr3t-token" not in proc.stdout
    bad = env.run("master_mapper.py", NOTIFY_URLS="not-a-url-s3cr3t")
    assert bad.returncode == 2 and "NOTIFY_URLS" in bad.stderr and "s3cr3t" not in bad.stderr
