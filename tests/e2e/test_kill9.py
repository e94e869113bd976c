"""kill -9 at random instants, then rerun to the end: nothing lost, nothing trusted half-written.

Rounds per script come from KILL_ROUNDS (default 3) and seeds from KILL_SEEDS (default 11);
raise them for a longer soak outside CI, e.g. KILL_ROUNDS=10 KILL_SEEDS=1,2,3,4.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from e2ekit import kill_at
from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e

ROUNDS = int(os.environ.get("KILL_ROUNDS", "3"))
SEEDS = [int(s) for s in os.environ.get("KILL_SEEDS", "11").split(",")]
SCRIPTS = ("master_mapper.py", "python_zipper.py", "python_unzipper.py")


def observe(env, seen: dict[str, set]) -> None:
    """Record every part's ETag; every record on S3 must parse completely."""
    for key, meta in env.objects().items():
        if key.endswith(".zip"):
            seen.setdefault(key, set()).add(meta["ETag"])
        elif key.endswith(".json") and "/_probe/" not in key:
            json.loads(env.get(key))


@pytest.mark.parametrize("form", ["local paths", "rclone remotes"])
@pytest.mark.parametrize("seed", SEEDS)
def test_kill9_at_random_instants_then_rerun(env, seed, form):
    """Local SOURCE and DESTINATION are read and written in place; as remotes, rclone moves
    every file through staging folders: both are killed at random instants."""
    if form == "rclone remotes":
        env.via_rclone()
    rng = random.Random(seed)
    make_tree(env.source, small_files=45)
    seen: dict[str, set] = {}
    for script in SCRIPTS:
        killed = 0
        for _ in range(ROUNDS):
            # Slow transfers down in some rounds, so kills also land mid-download and mid-upload.
            extra = {"RCLONE_BWLIMIT": "200k"} if rng.random() < 0.5 else {}
            killed += kill_at(env, script, rng.uniform(0.3, 3.0), **extra) == -signal.SIGKILL
            observe(env, seen)
        assert killed, f"no kill landed while {script} was running"
        final = env.run(script)
        assert final.returncode == 0, f"{script} after kills: {final.stderr[-3000:]}"
        observe(env, seen)
    assert_same_tree(env.source, env.destination)
    changed = {k: v for k, v in seen.items() if len(v) > 1}
    assert not changed, f"parts uploaded twice with different contents: {changed}"
    # Temporary folders of dead runs are gone after the final runs.
    for script in ("mapper", "zipper", "unzipper"):
        tmp = os.path.join(env.vars["WORK_DIR"], ".tmp", script)
        assert not os.path.exists(tmp) or not os.listdir(tmp), f"{tmp} not cleaned"
    assert not os.path.exists(os.path.join(env.destination, ".python_unzipper.tmp"))


def test_orphaned_rclone_of_a_killed_run_is_ended(env):
    """kill -9 of the Python process alone (the OOM killer does that) leaves rclone running;
    the next run ends it before cleaning the temporary folder."""
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    proc = env.popen("python_zipper.py", RCLONE_BWLIMIT="10k", MAX_PARALLEL_WORKERS="1")
    children_file = os.path.join(env.vars["WORK_DIR"], ".zipper.children")
    deadline = time.monotonic() + 30

    def copying() -> int | None:
        """The PID of a running ``rclone copy`` child (the start-up checks are short-lived children too)."""
        if not os.path.exists(children_file):
            return None
        for line in open(children_file).read().splitlines():
            pid = int(line.split()[0])
            try:
                if b"\0copy" in open(f"/proc/{pid}/cmdline", "rb").read():  # copy or copyto
                    return pid
            except OSError:
                continue
        return None
    while time.monotonic() < deadline and copying() is None:
        time.sleep(0.1)
    orphan = copying()
    assert orphan is not None, "no rclone copy was started"
    proc.kill()
    proc.communicate()
    assert os.path.exists(f"/proc/{orphan}"), "the rclone child should outlive a kill -9 of its parent"
    rerun = env.run("python_zipper.py")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "left running by a killed run" in rerun.stderr
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{orphan}") or open(f"/proc/{orphan}/stat").read().split()[2] == "Z"
