"""Repairs that finish: a large file or an empty directory removed at DESTINATION is named by
--verify, and one zipper run and one unzipper run put it back and clear the repair; --verify
before the zipper says the zipper is what to run."""

from __future__ import annotations

import os
import shutil

import pytest

from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e

STAGES = ("master_mapper.py", "python_zipper.py", "python_unzipper.py")


def _migrate(env) -> None:
    for script in STAGES:
        proc = env.run(script)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"


def test_a_removed_large_file_and_empty_directory_are_repaired_in_one_round(env):
    make_tree(env.source, small_files=5)
    _migrate(env)
    os.remove(os.path.join(env.destination, "Big", "huge one.bin"))
    shutil.rmtree(os.path.join(env.destination, "A B", "empty inside"))
    shutil.rmtree(os.path.join(env.destination, "Empty Top"))

    verify = env.run("python_unzipper.py", "--verify")
    assert verify.returncode == 3, verify.stderr[-3000:]
    assert "missing  Big/huge one.bin" in verify.stdout
    assert "missing  A B/empty inside/" in verify.stdout
    assert "missing  Empty Top/" in verify.stdout

    # One round: zipper, then unzipper; both finish, and the repair is cleared.
    zipper = env.run("python_zipper.py")
    assert zipper.returncode == 0, zipper.stderr[-3000:]
    assert "copying large file 'huge one.bin'" in zipper.stderr
    unzipper = env.run("python_unzipper.py")
    assert unzipper.returncode == 0, unzipper.stderr[-3000:]
    assert_same_tree(env.source, env.destination)
    assert not [k for k in env.objects() if "_repair/" in k]

    # Nothing is left to do: the next round copies nothing and --verify agrees.
    again = env.run("python_zipper.py")
    assert again.returncode == 0 and "copying large file" not in again.stderr
    assert env.run("python_unzipper.py").returncode == 0
    assert env.run("python_unzipper.py", "--verify").returncode == 0


def test_verify_before_the_zipper_says_to_run_the_zipper(env):
    make_tree(env.source, small_files=3)
    assert env.run("master_mapper.py").returncode == 0
    verify = env.run("python_unzipper.py", "--verify")
    assert verify.returncode == 3
    assert "malformed" not in verify.stderr
    assert "has not been made yet" in verify.stderr and "run python_zipper.py" in verify.stderr
