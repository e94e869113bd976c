"""Stages started together (issue 19), end to end: the real scripts as subprocesses, real rclone,
moto's server. The three are started in reversed order a few seconds apart; each follows the one
before it through the bucket and ends when that one has ended and nothing is left for it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from e2ekit import ROOT, Env, base_env
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


SCRIPTS = ("python_unzipper.py", "python_zipper.py", "master_mapper.py")


def start_together(env: Env, work_dir: str | None = None, **extra: str) -> dict[str, subprocess.Popen]:
    """The three stages at one instant, each in its own process group (a kill takes its rclone too)."""
    env_vars = {**env.vars, "UPSTREAM_WAIT": "60", "LEASE_SECONDS": "6", "PROGRESS_INTERVAL": "1", **extra}
    if work_dir:
        env_vars["WORK_DIR"] = work_dir
    return {s: subprocess.Popen([sys.executable, os.path.join(ROOT, s)], env=env_vars, cwd=env.tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for s in SCRIPTS}


@pytest.mark.parametrize("victim, after_s", [("master_mapper.py", 1.5), ("python_zipper.py", 3.0),
                                             ("python_unzipper.py", 4.0)])
def test_kill9_of_one_stage_while_all_three_run_then_migrate_finishes(env: Env, victim: str, after_s: float):
    folders_tree(env.source, folders=6, files=11)
    env.via_rclone()
    procs = start_together(env, RCLONE_BWLIMIT="200k", MAX_PARALLEL_WORKERS="1")
    time.sleep(after_s)
    os.killpg(procs[victim].pid, signal.SIGKILL)
    codes = {s: p.wait(120) for s, p in procs.items()}
    for proc in procs.values():
        proc.communicate()
    assert codes[victim] == -signal.SIGKILL, codes
    # The others end on their own (the dead stage's heartbeat names a process that is gone),
    # with 0, or 4 for what the dead one left undone.
    assert all(codes[s] in (0, 4) for s in SCRIPTS if s != victim), codes
    rerun = env.run("migrate.py", RERUN_BACKOFF="1", LEASE_SECONDS="6", UPSTREAM_WAIT="10", timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert_same_tree(env.source, env.destination)


def test_two_workers_per_stage_on_claims_started_together_do_each_unit_once(env: Env):
    folders_tree(env.source, folders=6, files=11)
    env.via_rclone()
    workers = [start_together(env, os.path.join(env.tmp, f"work{n}"), WORKER_ID=f"w{n}", RCLONE_BWLIMIT="300k")
               for n in (1, 2)]
    results = {(n, s): (p.wait(180), p.communicate()[1]) for n, w in enumerate(workers) for s, p in w.items()}
    assert all(code == 0 for code, _err in results.values()), {k: (c, e[-2000:]) for k, (c, e) in results.items()}
    assert_same_tree(env.source, env.destination)
    objects = env.objects()
    parts = [k for k in objects if k.startswith(env.prefix + "_parts/") and k.endswith(".json")]
    made = sum(err.count("part uploaded:") for (_n, s), (_c, err) in results.items() if s == "python_zipper.py")
    restored = sum(err.count("part restored:") for (_n, s), (_c, err) in results.items() if s == "python_unzipper.py")
    assert made == len(parts) == restored, (made, len(parts), restored)
    for stage in ("python_zipper.py", "python_unzipper.py"):
        assert all("mode: claims" in results[(n, stage)][1] for n in (0, 1))
        assert all(err.count("part ") > 0 for (_n, s), (_c, err) in results.items() if s == stage)


def test_static_shards_started_together_on_a_server_without_conditional_writes(tmp_path, rclone_s3):
    """rclone serve s3 ignores conditional writes: two workers per stage with WORKER_COUNT=2, the
    six started at one instant; each shard's zipper follows the mapper folder by folder."""
    endpoint, _data = rclone_s3
    bucket = f"together-{os.getpid()}-{random.randrange(10**6)}"
    env = Env(endpoint=endpoint, bucket=bucket, tmp=str(tmp_path), vars=base_env(str(tmp_path), endpoint, bucket))
    env.s3.create_bucket(Bucket=bucket)
    folders_tree(env.source, folders=6, files=11)
    env.via_rclone()
    workers = [start_together(env, os.path.join(env.tmp, f"work{n}"), WORKER_ID=f"s{n}", WORKER_COUNT="2",
                              WORKER_INDEX=str(n), RCLONE_BWLIMIT="300k") for n in (0, 1)]
    results = {(n, s): (p.wait(180), p.communicate()[1]) for n, w in enumerate(workers) for s, p in w.items()}
    assert all(code == 0 for code, _err in results.values()), {k: (c, e[-2000:]) for k, (c, e) in results.items()}
    assert_same_tree(env.source, env.destination)
    for stage in SCRIPTS:
        assert all("static shard" in results[(n, stage)][1] for n in (0, 1)), stage
    parts = [k for k in env.objects() if k.startswith(env.prefix + "_parts/") and k.endswith(".json")]
    made = sum(err.count("part uploaded:") for (_n, s), (_c, err) in results.items() if s == "python_zipper.py")
    assert made == len(parts)


def test_a_delta_pass_mapped_and_zipped_while_the_first_generation_is_restored(env: Env):
    """A new generation (FORCE_RESCAN) is mapped and zipped while an unzipper still restores the
    first one: it finishes the first, the next unzipper the second; nothing is lost or mixed."""
    folders_tree(env.source, folders=6, files=11)
    env.via_rclone()
    for script in ("master_mapper.py", "python_zipper.py"):
        assert env.run(script).returncode == 0
    unzipper = env.popen("python_unzipper.py", RCLONE_BWLIMIT="150k", LEASE_SECONDS="6", MAX_PARALLEL_WORKERS="1")
    time.sleep(1.5)
    with open(os.path.join(env.source, "top 01", "added.txt"), "wb") as fh:
        fh.write(os.urandom(1234))
    with open(os.path.join(env.source, "top 02", "file 03.txt"), "wb") as fh:
        fh.write(os.urandom(4321))
    os.remove(os.path.join(env.source, "top 03", "file 00.txt"))
    delta = {"LEASE_SECONDS": "6", "UPSTREAM_WAIT": "30", "WORK_DIR": os.path.join(env.tmp, "work-delta")}
    mapper = env.popen("master_mapper.py", FORCE_RESCAN="1", **delta)
    zipper = env.popen("python_zipper.py", **delta)
    results = {name: (p.wait(180), p.communicate()[1]) for name, p in
               (("unzipper", unzipper), ("mapper", mapper), ("zipper", zipper))}
    assert {k: c for k, (c, _e) in results.items()} == {"unzipper": 0, "mapper": 0, "zipper": 0}, \
        {k: (c, e[-2000:]) for k, (c, e) in results.items()}
    assert "map generation 1" in results["unzipper"][1] and "map generation 2" in results["zipper"][1]
    final = env.run("python_unzipper.py", PROPAGATE_DELETES="1", MAX_DELETE="100%")
    assert final.returncode == 0, final.stderr[-3000:]
    assert "map generation 2" in final.stderr
    assert_same_tree(env.source, env.destination)
