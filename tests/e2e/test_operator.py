"""Operator experience: --help, progress, summary, JSON logs, dry run, the last line of every exit."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from e2ekit import ROOT

pytestmark = pytest.mark.e2e

SCRIPTS = ("master_mapper.py", "python_zipper.py", "python_unzipper.py")
READS = {
    "master_mapper.py": ["SOURCE", "S3_BUCKET", "S3_PREFIX", "S3_ENDPOINT", "WORK_DIR", "LARGE_FILE_THRESHOLD_GB",
                         "SPLIT_THRESHOLD", "MAX_ZIP_SIZE_GB", "FORCE_RESCAN", "LOG_FORMAT", "DRY_RUN",
                         "PROGRESS_INTERVAL"],
    "python_zipper.py": ["SOURCE", "DESTINATION", "S3_BUCKET", "DOWNLOAD_THREADS", "MAX_PARALLEL_WORKERS",
                         "DISK_LIMIT_PERCENT", "S3_CHECKSUMS", "DRY_RUN", "PROGRESS_INTERVAL"],
    "python_unzipper.py": ["DESTINATION", "S3_BUCKET", "UPLOAD_THREADS", "SKIP_UPLOAD", "LOCAL_OUTPUT_DIR",
                           "MAX_ZIP_BOMB_RATIO", "DRY_RUN", "PROGRESS_INTERVAL"],
}


def make_tree(root: str, small_files: int = 12) -> None:
    """A few folders: parts by count, one large file, an empty directory."""
    files = {f"Photos/img_{i:03d}.jpg": 300 + i for i in range(small_files)}
    files.update({"Big/huge one.bin": 600_000, "Docs/a b.txt": 50, "root.txt": 10})
    for rel, size in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(os.urandom(size))
    os.makedirs(os.path.join(root, "Docs", "empty"), exist_ok=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_needs_no_configuration(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for var in READS[script]:
        assert var in proc.stdout, f"--help of {script} does not mention {var}"
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "75 ", "130 ", "143 "):
        assert f"  {code}" in proc.stdout
    assert "Example" in proc.stdout and "[" in proc.stdout  # defaults in brackets


def test_progress_lines_and_summary_when_not_a_terminal(env):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    proc = env.run("python_zipper.py", PROGRESS_INTERVAL="1", RCLONE_BWLIMIT="150k")
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stderr.splitlines() if "progress:" in line]
    assert len(progress) >= 2, proc.stderr[-3000:]
    assert all("units" in line and "ETA" in line and "/s" in line for line in progress)
    last = proc.stderr.strip().splitlines()
    assert "summary:" in last[-2] and "done" in last[-2] and "failed" in last[-2] and "skipped" in last[-2]
    assert last[-1].endswith("done. Next: python python_unzipper.py")


def test_progress_bar_on_a_terminal(env):
    env.via_rclone()  # rclone moves every file, and RCLONE_BWLIMIT slows it
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "python_zipper.py")],
                            env={**env.vars, "RCLONE_BWLIMIT": "150k"}, cwd=env.tmp,
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(120)
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen[-3000:]
    assert "B/s" in screen and "units" in screen and "zipper:" in screen, screen[-2000:]


JSON_KEYS = {"time", "level", "script", "worker", "folder", "part", "event", "message", "fields"}


def test_json_logs_every_line_including_rclone(env):
    env.via_rclone()  # every script then runs rclone, whose lines must be JSON too
    make_tree(env.source, small_files=12)
    for script in SCRIPTS:
        proc = env.run(script, LOG_FORMAT="json", RCLONE_LOG_LEVEL="DEBUG")
        assert proc.returncode == 0
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        objs = [json.loads(line) for line in lines]  # every line is one JSON object
        for obj in objs:
            assert set(obj) - {"exit_code"} == JSON_KEYS, obj
            assert obj["worker"], obj
        assert any(o["message"].startswith("rclone: ") for o in objs), f"{script}: no rclone line"
        assert any(o["folder"] for o in objs)
        # The run ends with one summary event: its exit code is the process's, its totals numbers.
        last = json.loads(proc.stderr.strip().splitlines()[-1])
        assert last["event"] == "summary" and last["exit_code"] == proc.returncode == last["fields"]["exit_code"]
        assert [o["event"] for o in objs].count("summary") == 1
        assert last["fields"]["units_done"] > 0 and isinstance(last["fields"]["bytes_done"], int)
        kind = {"python_zipper.py": "part_uploaded", "python_unzipper.py": "part_restored"}.get(script)
        if kind:
            parts = [o for o in objs if o["event"] == kind]
            assert parts and all(isinstance(o["fields"]["files"], int) and o["fields"]["bytes"] > 0
                                 and o["folder"] is not None and o["part"] for o in parts), parts[:2]
    bad = env.run("python_zipper.py", LOG_FORMAT="json", S3_BUCKET="")
    last = json.loads(bad.stderr.strip().splitlines()[-1])
    assert bad.returncode == 2 and last["event"] == "summary" and last["exit_code"] == 2
    status = env.run("python_unzipper.py", "--status", LOG_FORMAT="json")
    assert all(json.loads(line)["message"] is not None for line in status.stdout.splitlines())


def test_dry_run_prints_the_plan_and_changes_nothing(env):
    make_tree(env.source, small_files=12)
    mapper = env.run("master_mapper.py", DRY_RUN="1")
    assert mapper.returncode == 0, mapper.stderr[-2000:]
    assert "plan for map generation 1" in mapper.stdout and "Photos" in mapper.stdout
    assert "large file Big/huge one.bin" in mapper.stdout
    assert env.objects() == {}, "a dry run of the mapper wrote to S3"
    assert env.run("master_mapper.py").returncode == 0
    before = env.objects()
    zipper = env.run("python_zipper.py", DRY_RUN="1")
    assert zipper.returncode == 0 and "part Photos/Part1: 10 files" in zipper.stdout
    assert env.objects() == before, "a dry run of the zipper wrote to S3"
    assert not os.path.exists(env.destination)
    assert env.run("python_zipper.py").returncode == 0
    before = env.objects()
    dest_before = sorted(os.path.join(d, f) for d, _s, fs in os.walk(env.destination) for f in fs)
    assert len(dest_before) == 1  # the large file the zipper copied directly
    unzipper = env.run("python_unzipper.py", DRY_RUN="1")
    assert unzipper.returncode == 0 and "restore part Photos/Part1" in unzipper.stdout
    assert env.objects() == before, "a dry run of the unzipper wrote to S3"
    dest_after = sorted(os.path.join(d, f) for d, _s, fs in os.walk(env.destination) for f in fs)
    assert dest_after == dest_before, "a dry run wrote to DESTINATION"
    assert "nothing was changed" in unzipper.stderr


def test_every_nonzero_exit_ends_with_one_plain_line(env):
    make_tree(env.source, small_files=3)
    cases = [
        (env.run("python_zipper.py", MAX_ZIP_SIZE_GB="x"), 2, "invalid configuration"),
        (env.run("python_zipper.py"), 4, "run python master_mapper.py, then python python_zipper.py again"),
    ]
    assert env.run("master_mapper.py").returncode == 0
    cases.append((env.run("python_unzipper.py"), 4, "run python python_zipper.py, then python python_unzipper.py"))
    cases.append((env.run("python_zipper.py", RCLONE_BIN="/bin/false"), 3, "run python python_zipper.py again"))
    for proc, code, words in cases:
        assert proc.returncode == code, proc.stderr[-2000:]
        assert words in proc.stderr.strip().splitlines()[-1], proc.stderr.strip().splitlines()[-1]


def test_ctrl_c_on_a_terminal_counts_interrupted_not_failed_and_lines_stay_readable(env):
    """On a terminal with the bar shown, log lines are printed above it (through tqdm), never
    run into it; Ctrl-C (SIGINT to the foreground group) stops the run: 130, parts in flight
    counted as interrupted, none as failed."""
    import re
    import signal
    import time
    env.via_rclone()
    make_tree(env.source, small_files=40)
    assert env.run("master_mapper.py").returncode == 0
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "python_zipper.py")],
                            env={**env.vars, "RCLONE_BWLIMIT": "60k", "SPLIT_THRESHOLD": "5"}, cwd=env.tmp,
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks = []
    os.set_blocking(master, False)
    started = time.monotonic()
    sent = False
    while proc.poll() is None or time.monotonic() - started < 1:
        if not sent and time.monotonic() - started > 4:
            os.killpg(proc.pid, signal.SIGINT)
            sent = True
        try:
            chunks.append(os.read(master, 65536))
        except (BlockingIOError, OSError):
            time.sleep(0.05)
        if time.monotonic() - started > 60:
            break
    proc.wait(30)
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 130, screen[-3000:]
    summary = [line for line in screen.splitlines() if "summary:" in line][-1]
    assert "interrupted" in summary and " 0 failed" in summary, summary
    # Every log line starts on a line of its own: nothing of the bar before its time stamp.
    for raw in screen.replace("\r\n", "\n").split("\n"):
        shown = raw.split("\r")[-1]
        if re.search(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", shown):
            assert re.match(r"^(\x1b\[[0-9;]*[A-Za-z])*\d\d:\d\d:\d\d ", shown), repr(shown)
