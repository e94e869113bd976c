"""The pipeline on a second S3 server (rclone serve s3), and credentials it rejects."""

from __future__ import annotations

import os
import uuid

import pytest

from e2ekit import base_env, Env
from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


@pytest.fixture
def renv(tmp_path, rclone_s3) -> Env:
    endpoint, _data = rclone_s3
    bucket = f"r-{uuid.uuid4().hex[:12]}"
    e = Env(endpoint=endpoint, bucket=bucket, tmp=str(tmp_path), vars=base_env(str(tmp_path), endpoint, bucket))
    e.s3.create_bucket(Bucket=bucket)  # through the API: the server caches its directory listing
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


def test_part_corrupted_on_the_way_is_refused_by_the_server_or_caught_by_the_zipper(renv):
    """rclone serve s3 checks Content-MD5: a byte flipped in transit is refused (400 BadDigest).
    With S3_CHECKSUMS=off the server stores it, and the zipper's ETag check catches it."""
    from faultproxy import FaultProxy
    make_tree(renv.source, small_files=12)
    assert renv.run("master_mapper.py").returncode == 0
    real = renv.vars["S3_ENDPOINT"]
    with FaultProxy(real, corrupt_paths="Photos_Part1.zip") as proxy:
        renv.vars["S3_ENDPOINT"] = proxy.endpoint
        checked = renv.run("python_zipper.py")
        assert checked.returncode == 3, checked.stderr[-3000:]
        assert "BadDigest" in checked.stderr and proxy.corrupted >= 1
        unchecked = renv.run("python_zipper.py", S3_CHECKSUMS="off")
        assert unchecked.returncode == 3, unchecked.stderr[-3000:]
        assert "the upload was damaged" in unchecked.stderr
    renv.vars["S3_ENDPOINT"] = real
    for script in ("python_zipper.py", "python_unzipper.py"):
        proc = renv.run(script)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tree(renv.source, renv.destination)


def test_multipart_parts_on_a_server_whose_etags_are_whole_object_md5s(renv):
    """rclone serve s3 gives a multipart object the MD5 of its bytes, not MD5-of-MD5s-N."""
    os.makedirs(os.path.join(renv.source, "Big"))
    for i in range(3):
        with open(os.path.join(renv.source, "Big", f"chunk{i}.bin"), "wb") as fh:
            fh.write(os.urandom(7 << 20))
    extra = {"LARGE_FILE_THRESHOLD_GB": "0.05", "MAX_ZIP_SIZE_GB": "0.05"}
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        proc = renv.run(script, **extra)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"
    assert_same_tree(renv.source, renv.destination)
