"""The pipeline on a second S3 server (rclone serve s3), and credentials it rejects."""

from __future__ import annotations

import os
import uuid

import pytest

from conftest import base_env, Env
from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


@pytest.fixture
def renv(tmp_path, rclone_s3) -> Env:
    endpoint, data = rclone_s3
    bucket = f"r-{uuid.uuid4().hex[:12]}"
    os.makedirs(os.path.join(data, bucket))
    e = Env(endpoint=endpoint, bucket=bucket, tmp=str(tmp_path), vars=base_env(str(tmp_path), endpoint, bucket))
    os.makedirs(e.source, exist_ok=True)
    return e


def test_pipeline_on_rclone_serve_s3(renv):
    make_tree(renv.source, small_files=25)
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        proc = renv.run(script)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"
        assert "conditional writes ignored by the server" in proc.stderr
    assert_same_tree(renv.source, renv.destination)
    again = [renv.run(s).returncode for s in ("master_mapper.py", "python_zipper.py", "python_unzipper.py")]
    assert again == [0, 0, 0]


def test_rejected_credentials_exit_1_naming_the_bucket_and_hiding_the_secret(renv):
    make_tree(renv.source, small_files=3)
    secret = "wrong-secret-that-must-not-leak"
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        proc = renv.run(script, AWS_SECRET_ACCESS_KEY=secret)
        assert proc.returncode == 1, f"{script}: {proc.stderr[-2000:]}"
        assert renv.bucket in proc.stderr and "credentials were rejected" in proc.stderr
        assert secret not in proc.stdout + proc.stderr
