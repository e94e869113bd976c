"""The mistakes people make, answered plainly: an error no rerun can fix exits 2 naming the
variable and rclone's words (never 3, which systemd's timer reruns forever); bad configuration
is named, never a traceback; a typo in a variable's name is pointed out."""

from __future__ import annotations

import os
import stat

import pytest

pytestmark = pytest.mark.e2e


def _file(root: str, rel: str = "F/a.txt") -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("a")


def _plain(proc, code: int, *words: str) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in proc.stderr, f"{w!r} not in: {proc.stderr[-3000:]}"


@pytest.mark.parametrize("source", ["missing local", "missing remote folder", "unknown remote"])
def test_a_source_that_does_not_exist_exits_2_naming_it(env, source):
    value = {"missing local": os.path.join(env.tmp, "no such folder"),
             "missing remote folder": ":local:" + os.path.join(env.tmp, "no such folder"),
             "unknown remote": "onedrvie:Work"}[source]
    _plain(env.run("master_mapper.py", SOURCE=value), 2, "SOURCE")


def test_a_destination_remote_not_configured_exits_2(env):
    _file(env.source)
    assert env.run("master_mapper.py").returncode == 0
    _plain(env.run("python_zipper.py", DESTINATION="gdrvie:Work"), 2, "DESTINATION", "gdrvie")
    assert env.run("python_zipper.py").returncode == 0
    _plain(env.run("python_unzipper.py", DESTINATION="gdrvie:Work"), 2, "DESTINATION", "gdrvie")


def test_work_dir_that_is_a_file_or_read_only_is_named(env):
    as_file = os.path.join(env.tmp, "a file")
    open(as_file, "w").close()
    _plain(env.run("master_mapper.py", WORK_DIR=as_file), 2, "WORK_DIR")
    if os.geteuid() != 0:  # root writes anywhere
        ro = os.path.join(env.tmp, "read-only")
        os.makedirs(ro)
        os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
        _plain(env.run("master_mapper.py", WORK_DIR=ro), 2, "WORK_DIR")
    _plain(env.run("master_mapper.py", WORK_DIR="/proc/no-such-dir"), 2, "WORK_DIR")


def test_endpoint_without_a_scheme_is_named(env):
    _plain(env.run("master_mapper.py", S3_ENDPOINT="127.0.0.1:9000"), 2, "S3_ENDPOINT", "http://")


def test_prefix_without_a_slash_is_warned(env):
    _file(env.source)
    proc = env.run("master_mapper.py", S3_PREFIX="migration")
    assert proc.returncode == 0 and "S3_PREFIX" in proc.stderr and "'migration/'" in proc.stderr


def test_typos_in_variable_names_are_pointed_out(env):
    _file(env.source)
    proc = env.run("master_mapper.py", SPLIT_TRESHOLD="10")
    assert proc.returncode == 0
    assert "SPLIT_TRESHOLD" in proc.stderr and "SPLIT_THRESHOLD" in proc.stderr
    missing = dict(env.vars)
    missing["S3_BUCKETT"] = missing.pop("S3_BUCKET")
    import subprocess
    import sys
    from e2ekit import ROOT
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "master_mapper.py")], env=missing, cwd=env.tmp,
                          capture_output=True, text=True, timeout=60)
    _plain(proc, 2, "S3_BUCKET is required", "S3_BUCKETT")


def test_a_planning_variable_changed_after_the_map_says_the_map_keeps_its_plan(env):
    _file(env.source)
    assert env.run("master_mapper.py").returncode == 0
    proc = env.run("python_zipper.py", SPLIT_THRESHOLD="3")
    assert proc.returncode == 0
    assert "SPLIT_THRESHOLD=3" in proc.stderr and "keeps" in proc.stderr and "FORCE_RESCAN" in proc.stderr


def test_boto3_missing_is_one_line_naming_the_requirements(env, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "boto3.py").write_text("raise ImportError('No module named boto3')\n")
    proc = env.run("master_mapper.py", PYTHONPATH=str(fake))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "boto3 is not installed" in proc.stderr and "pip install -r requirements.txt" in proc.stderr
