"""rclone failing, hanging or missing: never an empty folder, never a silent loss."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


def make_shim(tmp: str, real: str, *, match: str, action: str, once_file: str | None = None) -> str:
    """An RCLONE_BIN that misbehaves when its arguments contain ``match``, else runs real rclone.

    action: "fail" (exit 1 with an error line), "hang" (sleep), "fail-once" (fail the first
    time only, remembered in ``once_file``).
    """
    path = os.path.join(tmp, f"rclone-shim-{action}")
    if action == "fail":
        bad = 'echo "ERROR : simulated failure" >&2; exit 1'
    elif action == "hang":
        bad = "exec sleep 600"
    elif action == "fail-once":
        bad = (f'if [ ! -e "{once_file}" ]; then touch "{once_file}"; echo "ERROR : transient" >&2; exit 5; fi; '
               f'exec "{real}" "$@"')
    else:
        raise ValueError(action)
    with open(path, "w") as fh:
        fh.write(f"""#!/bin/bash
for a in "$@"; do
    case "$a" in *{match}*) {bad} ;; esac
done
exec "{real}" "$@"
""")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def map_keys(env) -> list[str]:
    return sorted(k for k in env.objects() if "/_map/" in k)


def test_failed_listing_is_an_error_never_an_empty_folder(env):
    make_tree(env.source, small_files=12)
    shim = make_shim(env.tmp, env.vars["RCLONE_BIN"], match="/Photos", action="fail")
    proc = env.run("master_mapper.py", RCLONE_BIN=shim)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "'Photos'" in proc.stderr and "not mapped" in proc.stderr
    keys = map_keys(env)
    assert not any(k.endswith("index.json") for k in keys), "an incomplete map was published"
    assert not any(k.endswith("/Photos.jsonl.gz") for k in keys)
    assert f"{env.prefix}Photos_List.txt" not in env.objects()
    # The zipper refuses to work from an unfinished map.
    assert env.run("python_zipper.py").returncode == 4
    # A rerun lists only what is missing and completes the map.
    rerun = env.run("master_mapper.py")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "continuing unfinished map generation 1" in rerun.stderr
    index = json.loads(env.get([k for k in map_keys(env) if k.endswith("index.json")][0]))
    assert {f["name"]: f["files"] for f in index["folders"]}["Photos"] == 12


def test_hanging_listing_times_out_and_is_reported(env):
    make_tree(env.source, small_files=3)
    shim = make_shim(env.tmp, env.vars["RCLONE_BIN"], match="/Deep", action="hang")
    started = time.monotonic()
    proc = env.run("master_mapper.py", RCLONE_BIN=shim, COMMAND_TIMEOUT="3", timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "timed out" in proc.stderr and "'Deep'" in proc.stderr
    assert not any(k.endswith("index.json") for k in map_keys(env))


def test_transient_rclone_failure_is_retried(env):
    env.via_rclone()  # downloads go through rclone (the shim)
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    shim = make_shim(env.tmp, env.vars["RCLONE_BIN"], match="--files-from0", action="fail-once",
                     once_file=os.path.join(env.tmp, "failed-once"))
    proc = env.run("python_zipper.py", RCLONE_BIN=shim)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(env.tmp, "failed-once"))
    assert "retrying" in proc.stderr
    assert env.run("python_unzipper.py").returncode == 0
    assert_same_tree(env.source, env.destination)


def test_hanging_download_times_out_then_a_rerun_finishes(env):
    env.via_rclone()  # downloads go through rclone (the shim)
    make_tree(env.source, small_files=3)
    assert env.run("master_mapper.py").returncode == 0
    shim = make_shim(env.tmp, env.vars["RCLONE_BIN"], match="source/Photos", action="hang")
    started = time.monotonic()
    proc = env.run("python_zipper.py", RCLONE_BIN=shim, COMMAND_TIMEOUT="2", MAX_RETRY_DURATION="5",
                   timeout=240)
    assert time.monotonic() - started < 60
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "timed out" in proc.stderr and "part 'Full' of folder 'Photos'" in proc.stderr
    assert not os.listdir(os.path.join(env.vars["WORK_DIR"], ".tmp", "zipper")) if os.path.exists(
        os.path.join(env.vars["WORK_DIR"], ".tmp", "zipper")) else True
    assert env.run("python_zipper.py").returncode == 0
    assert env.run("python_unzipper.py").returncode == 0
    assert_same_tree(env.source, env.destination)
