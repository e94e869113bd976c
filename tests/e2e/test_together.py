"""Stages started together (issue 19), end to end: the real scripts as subprocesses, real rclone,
moto's server. The three are started in reversed order a few seconds apart; each follows the one
before it through the bucket and ends when that one has ended and nothing is left for it."""

from __future__ import annotations

import os
import time

import pytest

from e2ekit import Env
from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


def folders_tree(root: str, folders: int = 6, files: int = 11) -> None:
    """``folders`` top-level folders of small files (2 parts each) and files directly in SOURCE."""
    for name in ("root a.txt", "root b.txt"):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(os.urandom(500))
    for f in range(folders):
        for i in range(files):
            path = os.path.join(root, f"top {f:02d}", f"file {i:02d}.txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(os.urandom(3000 + 97 * i))


def slow_listing(env: Env, folder: str, seconds: float) -> str:
    """An RCLONE_BIN that takes ``seconds`` longer to list ``folder``."""
    path = os.path.join(env.tmp, "rclone-slow-listing")
    with open(path, "w") as fh:
        fh.write(f"""#!/bin/bash
case "$*" in *lsjson*"{folder}"*) sleep {seconds} ;; esac
exec "{env.vars['RCLONE_BIN']}" "$@"
""")
    os.chmod(path, 0o755)
    return path


def test_three_stages_started_in_reversed_order_finish_the_migration_together(env: Env):
    folders_tree(env.source)
    # SOURCE read through rclone and slowed, so the zipper takes seconds and the unzipper can
    # restore its first parts while it zips the rest.
    env.via_rclone()
    # A short lease keeps the pauses between passes short (at most LEASE_SECONDS/6).
    wait = {"UPSTREAM_WAIT": "60", "PROGRESS_INTERVAL": "2", "LEASE_SECONDS": "6"}
    unzipper = env.popen("python_unzipper.py", **wait)
    time.sleep(1)
    zipper = env.popen("python_zipper.py", RCLONE_BWLIMIT="100k", MAX_PARALLEL_WORKERS="1", **wait)
    time.sleep(1)
    # The mapper lists one folder slowly: the zipper starts on the folders mapped before it.
    mapper = env.popen("master_mapper.py", RCLONE_BIN=slow_listing(env, "top 05", 4), **wait)
    codes = {}
    for name, proc in (("mapper", mapper), ("zipper", zipper), ("unzipper", unzipper)):
        out, err = proc.communicate(timeout=240)
        codes[name] = (proc.returncode, err)
    assert {k: c for k, (c, _e) in codes.items()} == {"mapper": 0, "zipper": 0, "unzipper": 0}, \
        {k: (c, e[-3000:]) for k, (c, e) in codes.items()}
    assert_same_tree(env.source, env.destination)
    # The overlap is real: a part was restored at DESTINATION before the zipper made its last one.
    objects = env.objects()
    made = [o["LastModified"] for k, o in objects.items() if k.startswith(env.prefix + "_parts/")
            and k.endswith(".json")]
    restored = [o["LastModified"] for k, o in objects.items() if k.startswith(env.prefix + "_restored/")]
    assert len(made) >= 12 and len(restored) == len(made)
    assert min(restored) < max(made), "the unzipper restored nothing before the zipper ended"
    index = [o["LastModified"] for k, o in objects.items() if k.endswith("/index.json")]
    assert min(made) < min(index), "the zipper made no part before the whole map was written"
    assert "python_zipper.py is still running" in codes["unzipper"][1]
    assert "master_mapper.py is not running yet" in codes["zipper"][1]


def test_a_lone_unzipper_ends_with_4_within_its_wait(env: Env):
    make_tree(env.source, small_files=4)
    assert env.run("master_mapper.py").returncode == 0
    started = time.monotonic()
    proc = env.run("python_unzipper.py", UPSTREAM_WAIT="2")
    elapsed = time.monotonic() - started
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "python_zipper.py is not running yet; waiting for it up to UPSTREAM_WAIT=2s" in proc.stderr
    assert "wait for the zipper" in proc.stderr
    assert elapsed < 60  # bounded by the wait, not by a zipper that never comes


def test_stages_started_at_the_same_instant_on_a_tiny_tree_miss_nothing(env: Env):
    """The zipper can end between the unzipper's listing of part records and its look at the
    zipper's heartbeat: the unzipper looks once more, and restores the last parts too."""
    for name in ("A", "B"):
        for i in range(30):
            path = os.path.join(env.source, name, f"f{i:02d}.bin")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(os.urandom(2000))
    wait = {"UPSTREAM_WAIT": "60", "LEASE_SECONDS": "6"}
    procs = [env.popen(s, **wait) for s in ("python_unzipper.py", "python_zipper.py", "master_mapper.py")]
    results = [(p.returncode, err[-2000:]) for p in procs for _out, err in [p.communicate(timeout=120)]]
    assert [c for c, _e in results] == [0, 0, 0], results
    assert_same_tree(env.source, env.destination)
