"""Disk rules on WORK_DIR's filesystem: backpressure, the limit, and running out of space."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


def tree(root: str, files: int = 12, size: int = 150_000) -> None:
    os.makedirs(os.path.join(root, "Data"), exist_ok=True)
    for i in range(files):
        with open(os.path.join(root, "Data", f"f{i:02d}.bin"), "wb") as fh:
            fh.write(os.urandom(size))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_backpressure_waits_and_says_so_until_space_returns(env):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    tree(env.source, files=4, size=1000)
    assert env.run("master_mapper.py").returncode == 0
    reading = os.path.join(env.tmp, "disk-used-percent")
    with open(reading, "w") as fh:
        fh.write("75")  # above DISK_BACKPRESSURE_PERCENT=70, below the limit
    proc = env.popen("python_zipper.py", MIGRATION_TEST_DISK_USAGE_FILE=reading)
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "DISK_BACKPRESSURE_PERCENT" in line:
            break
    assert "waits for space" in lines[-1], "".join(lines)
    time.sleep(1.5)
    assert proc.poll() is None, "it did not wait"
    with open(reading, "w") as fh:
        fh.write("40")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "starts" in err


def test_part_that_would_pass_the_limit_is_not_started(env):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    tree(env.source, files=4, size=1000)
    assert env.run("master_mapper.py").returncode == 0
    reading = os.path.join(env.tmp, "disk-used-percent")
    with open(reading, "w") as fh:
        fh.write("79.99999999")  # a part of 4 kB does not fit under 80 % on any real disk
    proc = env.run("python_zipper.py", MIGRATION_TEST_DISK_USAGE_FILE=reading, DISK_BACKPRESSURE_PERCENT="80")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "needs" in proc.stderr and "may be used" in proc.stderr and "DISK_LIMIT_PERCENT=80" in proc.stderr
    assert not [k for k in env.objects() if k.endswith(".zip")], "a part was started"
    assert env.run("python_zipper.py").returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs, when this machine lets the test mount one (root, as on CI)."""
    mount_point = tmp_path / "smallfs"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.decode().strip()}; "
                    "the injected-reading tests cover the rules")
    yield str(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_small_filesystem_refuses_a_part_that_cannot_fit(env, small_fs):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    tree(env.source, files=20, size=200_000)  # 4 MB in one part: more than the whole filesystem
    env.vars["WORK_DIR"] = small_fs
    extra = {"MAX_ZIP_SIZE_GB": "0.01", "LARGE_FILE_THRESHOLD_GB": "0.01", "SPLIT_THRESHOLD": "1000"}
    assert env.run("master_mapper.py", **extra).returncode == 0
    proc = env.run("python_zipper.py", **extra)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "needs" in proc.stderr and "DISK_LIMIT_PERCENT" in proc.stderr


def test_running_out_of_space_mid_part_abandons_it_and_a_rerun_continues(env, small_fs):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    tree(env.source, files=10, size=150_000)  # one part of 1.5 MB on a 3 MiB filesystem
    env.vars["WORK_DIR"] = small_fs
    extra = {"MAX_ZIP_SIZE_GB": "0.01", "LARGE_FILE_THRESHOLD_GB": "0.01", "DISK_LIMIT_PERCENT": "100",
             "DISK_BACKPRESSURE_PERCENT": "100"}
    assert env.run("master_mapper.py", **extra).returncode == 0
    proc = env.popen("python_zipper.py", RCLONE_BWLIMIT="300k", **extra)
    staging_root = os.path.join(small_fs, ".tmp", "zipper")
    wait_for(lambda: os.path.isdir(staging_root) and any(
        os.path.isdir(os.path.join(staging_root, d)) for d in os.listdir(staging_root)), 30, "staging")
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb", buffering=0) as fh:  # someone else fills the disk while the part downloads
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert "no space left" in err.lower()
    assert not os.path.exists(staging_root) or not os.listdir(staging_root), "staging left behind"
    assert not [k for k in env.objects() if "/_parts/" in k], "an abandoned part was recorded"
    os.remove(filler)
    rerun = env.run("python_zipper.py", **extra)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    unzip = env.run("python_unzipper.py", **extra)
    assert unzip.returncode == 0, unzip.stderr[-3000:]
    assert_same_tree(env.source, env.destination)
