"""A provider quota at DESTINATION (issue 9): Google Drive's daily upload limit, which rclone's
--drive-stop-on-upload-limit turns into a fatal error. An RCLONE_BIN shim answers every upload
the way rclone does at that limit; everything else goes to the real rclone."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e

DRIVE_SAYS = ("ERROR : Google drive root 'Migrated': Received upload limit error: googleapi: Error 403: "
              "User rate limit exceeded., userRateLimitExceeded")


def drive_at_its_limit(tmp: str, real: str) -> tuple[str, str]:
    """(shim path, log of the uploads it refused)."""
    shim, calls = os.path.join(tmp, "rclone-at-limit"), os.path.join(tmp, "refused.log")
    with open(shim, "w") as fh:
        fh.write(f"""#!/bin/bash
case "$1" in
  copy|copyto)
    echo "$1" >> '{calls}'
    echo "2026/11/24 09:00:00 {DRIVE_SAYS}" >&2
    echo "2026/11/24 09:00:00 ERROR : Attempt 1/3 failed with 1 errors and: {DRIVE_SAYS.split(': ', 1)[1]}" >&2
    echo "2026/11/24 09:00:00 Failed to copy: fatal error encountered" >&2
    exit 7;;
esac
exec '{real}' "$@"
""")
    os.chmod(shim, os.stat(shim).st_mode | stat.S_IEXEC)
    open(calls, "w").close()
    return shim, calls


def refused(calls: str) -> int:
    return len(open(calls).read().split())


def test_a_daily_upload_limit_pauses_every_worker_and_the_next_day_finishes(env):
    env.via_rclone()  # the unzipper uploads with rclone copy, as to a cloud DESTINATION
    make_tree(env.source, small_files=15)
    for script in ("master_mapper.py", "python_zipper.py"):
        assert env.run(script).returncode == 0
    shim, calls = drive_at_its_limit(env.tmp, env.vars["RCLONE_BIN"])

    first = env.run("python_unzipper.py", RCLONE_BIN=shim, WORKER_ID="w1")
    assert first.returncode == 75, first.stderr[-3000:]
    assert "provider quota" in first.stderr and "User rate limit exceeded" in first.stderr
    assert "python_unzipper.py again after" in first.stderr
    tried = refused(calls)
    assert 1 <= tried <= 2, "a quota is final: rclone must not be run again and again"
    keys = env.objects()
    assert not [k for k in keys if "/_restored/" in k], "a part was marked restored though its upload failed"
    pause_key = f"{env.prefix}_pause/destination.json"
    pause = json.loads(env.get(pause_key))
    assert pause["worker"] == "w1" and pause["retry_after"] > pause["detected_at"]

    status = env.run("python_unzipper.py", "--status")
    assert status.returncode == 0 and "PAUSED" in status.stdout and pause["retry_after"] in status.stdout

    # Every other worker of the migration stops at once instead of hammering the provider.
    for script in ("python_unzipper.py", "python_zipper.py"):
        other = env.run(script, RCLONE_BIN=shim, WORKER_ID="w2", WORK_DIR=os.path.join(env.tmp, "work-2"))
        assert other.returncode == 75, other.stderr[-2000:]
        assert pause["retry_after"] in other.stderr
    assert refused(calls) == tried
    # The mapper does not write to DESTINATION: it is not held back.
    assert env.run("master_mapper.py").returncode == 0

    # The next day: the pause has passed, the quota is lifted.
    env.put(pause_key, json.dumps({**pause, "retry_after": "2001-01-01T00:00:00Z"}).encode())
    final = env.run("python_unzipper.py")
    assert final.returncode == 0, final.stderr[-3000:]
    assert pause_key not in env.objects()
    assert_same_tree(env.source, env.destination)
