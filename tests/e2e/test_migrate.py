"""migrate.py, the one command (issue 19, item 4), end to end: it starts the three real scripts
together, runs again from the stage that left work, and stops when a person must act."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from e2ekit import ROOT, Env
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


def broken_until(tmp: str, real: str, fixed: str) -> str:
    """An RCLONE_BIN whose downloads of folder Photos fail until the file ``fixed`` exists."""
    path = os.path.join(tmp, "rclone-broken-until")
    with open(path, "w") as fh:
        fh.write(f"""#!/bin/bash
case "$*" in *--files-from0*source/Photos*)
    if [ ! -e "{fixed}" ]; then echo "ERROR : simulated outage" >&2; exit 1; fi ;;
esac
exec "{real}" "$@"
""")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def migrate(env: Env, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "migrate.py")], env={**env.vars, **extra},
                            cwd=env.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_one_command_migrates_and_runs_again_from_the_stage_that_failed(env: Env):
    for folder, files in (("Photos", 12), ("Docs", 3), ("Music", 2)):
        for i in range(files):
            os.makedirs(os.path.join(env.source, folder), exist_ok=True)
            with open(os.path.join(env.source, folder, f"f{i:02d}.txt"), "wb") as fh:
                fh.write(os.urandom(700 + i))
    env.via_rclone()
    fixed = os.path.join(env.tmp, "fixed")
    shim = broken_until(env.tmp, env.vars["RCLONE_BIN"], fixed)
    proc = migrate(env, RCLONE_BIN=shim, MAX_RETRY_DURATION="2", RERUN_BACKOFF="2", UPSTREAM_WAIT="30",
                   LEASE_SECONDS="6")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "running again from python_zipper.py" in line:
            open(fixed, "w").close()  # the outage ends while the command waits before its next round
    assert proc.wait(60) == 0, "".join(lines[-60:])
    text = "".join(lines)
    assert "round 1: exit codes mapper 0, zipper 3, unzipper 4: work is left" in text, text[-4000:]
    assert "round 2: starting python_zipper.py, python_unzipper.py together" in text
    assert "round 2: exit codes zipper 0, unzipper 0: the migration is restored and verified" in text
    assert "simulated outage" in text  # the stages' own lines are shown
    assert "round 3" not in text
    assert_same_tree(env.source, env.destination)
    assert env.vars["AWS_SECRET_ACCESS_KEY"] not in text


def test_one_command_stops_at_once_when_a_person_must_act(env: Env):
    missing = os.path.join(env.tmp, "no such folder")
    started = time.monotonic()
    # The zipper and the unzipper would wait up to a minute for a map that never comes.
    proc = migrate(env, SOURCE=missing, UPSTREAM_WAIT="60", RERUN_BACKOFF="1", LOG_FORMAT="json")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out[-3000:]
    events = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line, the stages' too
    assert events[-1]["event"] == "summary" and events[-1]["exit_code"] == 2 and events[-1]["script"] == "migrate"
    assert time.monotonic() - started < 30
    assert "SOURCE" in out and "mapper ended with exit 2: stopping the others" in out
    assert "a person must act" in out and "round 2" not in out
    assert "Traceback" not in out


def test_one_command_checks_the_configuration_once_and_starts_nothing(env: Env):
    env.vars.pop("S3_BUCKET")
    proc = migrate(env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert out.count("S3_BUCKET is required") == 1 and "nothing was started" in out
    assert "round 1" not in out and "Traceback" not in out


def test_one_command_stops_at_a_quota_pause_or_waits_it_out_when_asked(env: Env):
    env.via_rclone()  # the unzipper uploads with rclone copy, as to a cloud DESTINATION
    for folder in ("A", "B"):
        os.makedirs(os.path.join(env.source, folder))
        for i in range(4):
            with open(os.path.join(env.source, folder, f"f{i}.txt"), "wb") as fh:
                fh.write(os.urandom(900))
    shim = at_its_limit(env.tmp, env.vars["RCLONE_BIN"], env.destination)
    proc = migrate(env, RCLONE_BIN=shim, RERUN_BACKOFF="1", LEASE_SECONDS="6")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-4000:]
    assert "DESTINATION refused uploads for a provider quota until" in out and "WAIT_FOR_QUOTA=1" in out
    assert "round 2" not in out
    pause_key = f"{env.prefix}_pause/destination.json"
    pause = json.loads(env.get(pause_key))
    assert not [k for k in env.objects() if "/_restored/" in k]

    # Asked to wait: it waits, looks at the pause again, and goes on once it is over.
    proc = migrate(env, RCLONE_BIN=shim, RERUN_BACKOFF="1", LEASE_SECONDS="6", WAIT_FOR_QUOTA="1")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "waiting" in line and "(WAIT_FOR_QUOTA=1)" in line:
            # The next day: the quota is lifted (the shim goes) and the pause has passed.
            os.remove(shim)
            shutil.copy(env.vars["RCLONE_BIN"], shim)
            env.put(pause_key, json.dumps({**pause, "retry_after": "2001-01-01T00:00:00Z"}).encode())
    assert proc.wait(60) == 0, "".join(lines[-40:])
    text = "".join(lines)
    assert "the quota pause at DESTINATION has ended; going on" in text
    assert "round 2: starting python_zipper.py, python_unzipper.py together" in text \
        or "round 2: starting python_unzipper.py together" in text
    assert_same_tree(env.source, env.destination)


def at_its_limit(tmp: str, real: str, destination: str) -> str:
    """An RCLONE_BIN that answers every copy to DESTINATION as Google Drive does at its daily limit."""
    path = os.path.join(tmp, "rclone-at-limit")
    says = "googleapi: Error 403: User rate limit exceeded., userRateLimitExceeded"
    with open(path, "w") as fh:
        fh.write(f"""#!/bin/bash
case "$1 $*" in copy*"{destination}"*)
    echo "ERROR : Google drive root 'Migrated': Received upload limit error: {says}" >&2
    echo "ERROR : Attempt 1/3 failed with 1 errors and: {says}" >&2
    echo "Failed to copy: fatal error encountered" >&2
    exit 7 ;;
esac
exec "{real}" "$@"
""")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path
