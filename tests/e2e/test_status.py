"""--status: one table across all stages of a half-finished migration, from S3 only."""

from __future__ import annotations

import json
import os
import time

import pytest

from test_rclone_trouble import make_shim

pytestmark = pytest.mark.e2e


def put_tree(root: str) -> None:
    for folder, n in (("Good", 3), ("Broken", 4), ("Many", 25)):
        for i in range(n):
            path = os.path.join(root, folder, f"f{i:02d}.txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(os.urandom(100 + i))


def status_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("Good", "Broken", "Many", "TOTAL"):
            rows[cells[0]] = cells
    return rows


def test_status_shows_every_stage_of_a_half_finished_migration(env):
    env.via_rclone()  # the zipper's downloads go through rclone (the shim)
    put_tree(env.source)
    before = env.run("master_mapper.py", "--status")
    assert before.returncode == 0 and "no complete map" in before.stdout
    assert env.run("master_mapper.py").returncode == 0
    shim = make_shim(env.tmp, env.vars["RCLONE_BIN"], match="source/Broken", action="fail")
    zipper = env.run("python_zipper.py", RCLONE_BIN=shim)
    assert zipper.returncode == 3
    unzipper = env.run("python_unzipper.py")
    assert unzipper.returncode == 4, unzipper.stderr[-2000:]

    proc = env.run("python_unzipper.py", "--status", SOURCE="", DESTINATION="")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = status_rows(proc.stdout)
    # folder files bytes(2 cells) parts uploaded restored large verified [last error]
    assert rows["Good"][1] == "3" and rows["Good"][4:8] == ["1", "1/1", "1/1", "0/0"] and rows["Good"][8] == "yes"
    assert rows["Many"][4:7] == ["3", "3/3", "3/3"] and rows["Many"][8] == "yes"
    assert rows["Broken"][4:7] == ["1", "0/1", "0/1"] and rows["Broken"][8] == "no"
    assert "zipper:" in " ".join(rows["Broken"][9:]), proc.stdout
    assert rows["TOTAL"][1] == "32" and rows["TOTAL"][5:7] == ["4/5", "4/5"]
    assert "zipper worker" in proc.stdout and "unfinished" in proc.stdout
    assert "left, ETA" in proc.stdout
    # --status takes no lock and needs no SOURCE or DESTINATION, from any script.
    lock = os.path.join(env.vars["WORK_DIR"], ".zipper.lock")
    before = open(lock).read()
    for script in ("master_mapper.py", "python_zipper.py"):
        other = env.run(script, "--status", SOURCE="", DESTINATION="")
        assert other.returncode == 0 and status_rows(other.stdout) == rows
    assert open(lock).read() == before and "pid" not in before  # untouched, and nobody holds it

    # After the zipper is fixed and everything reruns, the table says done.
    assert env.run("python_zipper.py").returncode == 0
    assert env.run("python_unzipper.py").returncode == 0
    done = status_rows(env.run("master_mapper.py", "--status", SOURCE="").stdout)
    assert done["TOTAL"][5:7] == ["5/5", "5/5"] and done["TOTAL"][8] == "4/4"  # with the root unit


def test_heartbeat_is_refreshed_while_running(env):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    put_tree(env.source)
    with open(os.path.join(env.source, "Good", "slow.bin"), "wb") as fh:
        fh.write(os.urandom(300_000))
    assert env.run("master_mapper.py").returncode == 0
    proc = env.popen("python_zipper.py", RCLONE_BWLIMIT="40k", PROGRESS_INTERVAL="1")
    try:
        def beat():
            keys = [k for k in env.objects() if "/_status/zipper/" in k]
            return json.loads(env.get(keys[0])) if keys else None
        deadline = time.monotonic() + 30
        first = None
        while time.monotonic() < deadline and not (first and first.get("current")):
            first = beat()
            time.sleep(0.3)
        assert first and first["state"] == "running" and first["current"], first
        time.sleep(2.5)
        second = beat()
        assert second["updated_at"] != first["updated_at"] or second["elapsed_s"] > first["elapsed_s"]
        assert second["state"] == "running"
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    final = beat()
    assert final["state"] == "finished" and final["units_done"] >= 5 and final["exit_code"] == 0


def test_a_killed_worker_shows_as_stale_with_its_age_and_no_eta(env):
    env.via_rclone()
    put_tree(env.source)
    with open(os.path.join(env.source, "Good", "slow.bin"), "wb") as fh:
        fh.write(os.urandom(400_000))
    assert env.run("master_mapper.py").returncode == 0
    import signal
    import subprocess
    import sys
    from e2ekit import ROOT
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "python_zipper.py")],
                            env={**env.vars, "RCLONE_BWLIMIT": "40k", "PROGRESS_INTERVAL": "1"},
                            cwd=env.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not [k for k in env.objects() if "/_status/zipper/" in k]:
        time.sleep(0.2)
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(4.5)  # over three heartbeat intervals of 1 s
    status = env.run("python_zipper.py", "--status", SOURCE="", DESTINATION="")
    line = [l for l in status.stdout.splitlines() if l.startswith("zipper worker")][0]
    assert "stale" in line and "last heartbeat" in line and "running" not in line, line
    zipper_eta = [l for l in status.stdout.splitlines() if l.startswith("zipper:")][0]
    assert "ETA" not in zipper_eta or "ETA unknown" in zipper_eta, zipper_eta
