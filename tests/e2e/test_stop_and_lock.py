"""Lock, signals and bad input, on the real scripts."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


def rclone_children(pid: int) -> list[int]:
    """PIDs of rclone processes whose parent is ``pid`` or that sit in a group it started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")[0]
        except OSError:
            continue
        if cmd.endswith(b"rclone") and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def cmdline(pid: int) -> bytes:
    """A process's command line; empty once it has ended (it may end between a listing and this)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_download_stops_cleanly_and_rerun_finishes(env, sig, code):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    # Slow every transfer down (rclone reads flags from RCLONE_* variables), so the signal
    # lands while rclone is downloading a part.
    proc = env.popen("python_zipper.py", RCLONE_BWLIMIT="20k", MAX_PARALLEL_WORKERS="1")
    children = wait_for(lambda: [c for c in rclone_children(proc.pid)
                                 if b"copy" in cmdline(c)], 30, "a download")
    tmp_dir = os.path.join(env.vars["WORK_DIR"], ".tmp", "zipper")
    assert os.listdir(tmp_dir), "no staging folder while downloading"
    started = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10, "did not stop within 10 s"
    assert proc.returncode == code, err[-3000:]
    for child in children:
        assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z", \
            f"rclone child {child} survived"
    assert not os.path.exists(tmp_dir) or not os.listdir(tmp_dir), "temporary files left behind"
    lock = json.loads(open(os.path.join(env.vars["WORK_DIR"], ".zipper.lock")).read())
    assert "pid" not in lock and len(lock["earlier_runs"]) == 1, f"the lock still names a holder: {lock}"
    assert "run again" in err
    # A rerun continues and the whole migration completes.
    assert env.run("python_zipper.py").returncode == 0
    assert env.run("python_unzipper.py").returncode == 0
    assert_same_tree(env.source, env.destination)


def test_sigterm_during_unzipper_upload_stops_cleanly_and_rerun_finishes(env):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    make_tree(env.source, small_files=12)
    for script in ("master_mapper.py", "python_zipper.py"):
        assert env.run(script).returncode == 0
    proc = env.popen("python_unzipper.py", RCLONE_BWLIMIT="20k", MAX_PARALLEL_WORKERS="2")
    children = wait_for(lambda: [c for c in rclone_children(proc.pid)
                                 if b"copy" in cmdline(c)], 30, "an upload")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 143, err[-3000:]
    for child in children:
        assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
    tmp_dir = os.path.join(env.vars["WORK_DIR"], ".tmp", "unzipper")
    assert not os.path.exists(tmp_dir) or not os.listdir(tmp_dir)
    rerun = env.run("python_unzipper.py")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_tree(env.source, env.destination)


def test_second_instance_exits_75_naming_the_holder(env):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    first = env.popen("python_zipper.py", RCLONE_BWLIMIT="20k", MAX_PARALLEL_WORKERS="1")
    try:
        lock_path = os.path.join(env.vars["WORK_DIR"], ".zipper.lock")
        wait_for(lambda: os.path.exists(lock_path) and open(lock_path).read(), 30, "the lock")
        # The live holder's temporary folder must survive the second instance.
        sentinel = os.path.join(env.vars["WORK_DIR"], ".tmp", "zipper", "live-holder-file")
        open(sentinel, "w").close()
        started = time.monotonic()
        second = env.run("python_zipper.py", timeout=60)
        assert time.monotonic() - started < 10
        assert second.returncode == 75, second.stderr[-2000:]
        assert os.path.exists(sentinel), "the second instance cleaned the live holder's temporary folder"
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert "another instance holds the lock" in second.stderr.strip().splitlines()[-1]
        # With INSTANCE_LOCK_TIMEOUT it waits, then gives up with the same answer.
        started = time.monotonic()
        waited = env.run("python_zipper.py", INSTANCE_LOCK_TIMEOUT="2", timeout=60)
        assert waited.returncode == 75 and time.monotonic() - started >= 2
        # Another script on the same WORK_DIR is not blocked by the zipper's lock (a dry run: a real
        # one would follow this zipper until it ends).
        other = env.run("python_unzipper.py", DRY_RUN="1", timeout=120)
        assert other.returncode == 0, other.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    # The lock of a dead process is free: kill -9 leaves the file, the kernel drops the flock.
    dead = env.popen("python_zipper.py", RCLONE_BWLIMIT="20k", MAX_PARALLEL_WORKERS="1")
    wait_for(lambda: open(lock_path).read() and json.loads(open(lock_path).read()).get("pid") == dead.pid,
             30, "the lock of the second holder")
    dead.kill()
    dead.communicate(timeout=30)
    for child in rclone_children(dead.pid):
        os.kill(child, signal.SIGKILL)
    assert env.run("python_zipper.py").returncode == 0


@pytest.mark.parametrize("var,value", [
    ("MAX_ZIP_SIZE_GB", "lots"),
    ("MAX_ZIP_SIZE_GB", "0.0001"),        # below LARGE_FILE_THRESHOLD_GB
    ("MAX_PARALLEL_WORKERS", "0"),
    ("SPLIT_THRESHOLD", "-3"),
    ("DISK_LIMIT_PERCENT", "101"),
    ("S3_BUCKET", ""),
    ("SOURCE", ""),
])
def test_bad_configuration_exits_2_naming_the_variable_and_touches_nothing(env, var, value):
    make_tree(env.source, small_files=3)
    proc = env.run("master_mapper.py", **{var: value})
    assert proc.returncode == 2, proc.stderr
    assert var in proc.stderr
    assert env.objects() == {}
    assert not os.path.exists(env.vars["WORK_DIR"])


def test_missing_bucket_and_bad_credentials_exit_1_without_the_secret(env):
    make_tree(env.source, small_files=3)
    missing = env.run("master_mapper.py", S3_BUCKET="no-such-bucket-here")
    assert missing.returncode == 1
    assert "no-such-bucket-here" in missing.stderr
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        proc = env.run(script, S3_BUCKET="no-such-bucket-here")
        assert env.vars["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def test_missing_rclone_exits_1_naming_it(env):
    make_tree(env.source, small_files=3)
    proc = env.run("master_mapper.py", RCLONE_BIN="/nonexistent/rclone")
    assert proc.returncode == 1
    assert "RCLONE_BIN" in proc.stderr and "/nonexistent/rclone" in proc.stderr
