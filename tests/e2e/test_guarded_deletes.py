"""Deletions a person sees coming: an emptied SOURCE (an expired token or a failed mount looks
exactly like that) with PROPAGATE_DELETES=1 deletes nothing over MAX_DELETE and exits 2; DRY_RUN
lists every deletion by path; what is deleted is counted."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from treecheck import snapshot

pytestmark = pytest.mark.e2e

STAGES = ("master_mapper.py", "python_zipper.py", "python_unzipper.py")


def _tree(src: str, n: int = 30) -> None:
    for i in range(n):
        path = os.path.join(src, f"F{i % 3}", f"file {i:02d}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(f"file {i}\n" * 20)


def _pass(env, **extra) -> None:
    for script in STAGES:
        proc = env.run(script, **extra)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"


def test_an_emptied_source_deletes_nothing_over_max_delete(env):
    _tree(env.source)
    _pass(env)
    before = snapshot(env.destination)
    for name in os.listdir(env.source):
        shutil.rmtree(os.path.join(env.source, name))
    mapper = env.run("master_mapper.py", FORCE_RESCAN="1")
    assert mapper.returncode == 0, mapper.stderr[-3000:]
    assert "holds 0 files, the one before it 30" in mapper.stderr  # the mapper warns

    dry = env.run("python_unzipper.py", PROPAGATE_DELETES="1", DRY_RUN="1")
    assert dry.returncode == 0, dry.stderr[-3000:]
    listed = [line for line in dry.stdout.splitlines() if line.startswith("would delete ")]
    assert len(listed) == 30 and "would delete F0/file 00.txt" in listed
    assert "30 files would be deleted" in dry.stdout and "over MAX_DELETE" in dry.stdout

    real = env.run("python_unzipper.py", PROPAGATE_DELETES="1")
    assert real.returncode == 2, real.stderr[-3000:]
    assert "MAX_DELETE" in real.stderr and "would delete 30 files" in real.stderr
    assert "MAX_DELETE=30" in real.stderr  # how to allow it
    assert snapshot(env.destination) == before  # nothing deleted

    allowed = env.run("python_unzipper.py", PROPAGATE_DELETES="1", MAX_DELETE="100%")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert not [p for p, v in snapshot(env.destination).items() if v[0] == "file"]
    report = json.load(open(os.path.join(env.vars["WORK_DIR"], "reports", "latest.json")))
    assert report["totals"]["deleted_files"] == 30
    assert "deleted at DESTINATION: 30 files" in allowed.stderr


def test_a_few_deletions_pass_under_the_default_limit(env):
    _tree(env.source, n=30)
    _pass(env)
    os.remove(os.path.join(env.source, "F1", "file 01.txt"))
    _pass(env, FORCE_RESCAN="1", PROPAGATE_DELETES="1")
    assert not os.path.exists(os.path.join(env.destination, "F1", "file 01.txt"))


@pytest.mark.parametrize("value", ["ten", "-1", "150%"])
def test_a_bad_max_delete_is_named(env, value):
    proc = env.run("python_unzipper.py", MAX_DELETE=value)
    assert proc.returncode == 2 and "MAX_DELETE" in proc.stderr and "Traceback" not in proc.stderr


def test_the_unzippers_dry_run_shows_what_the_real_run_would_wait_for(env):
    _tree(env.source, n=12)
    assert env.run("master_mapper.py").returncode == 0
    dry = env.run("python_unzipper.py", DRY_RUN="1")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "0 parts to restore" in dry.stdout and "3 folders waiting for the zipper" in dry.stdout, dry.stdout
    assert "wait for the zipper: folder F0: 0 of 1 part zipped" in dry.stdout, dry.stdout
    assert env.run("python_unzipper.py").returncode == 4
