"""End to end: the three real scripts as subprocesses, real rclone, moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import os
import subprocess

import pytest

from sample_tree import make_tree
from treecheck import assert_same_tree, differences

pytestmark = pytest.mark.e2e

SCRIPTS = ("master_mapper.py", "python_zipper.py", "python_unzipper.py")


def run_all(env, **extra) -> list[subprocess.CompletedProcess]:
    results = []
    for script in SCRIPTS:
        proc = env.run(script, **extra)
        results.append(proc)
        assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return results


def index_of(env) -> dict:
    keys = [k for k in env.objects() if k.endswith("/index.json") and "/_map/" in k]
    assert keys, "no complete map generation on S3"
    return json.loads(env.get(sorted(keys)[-1]))


def test_full_pipeline_restores_every_awkward_name(env):
    tree = make_tree(env.source)
    mapper, zipper, unzipper = run_all(env)

    assert_same_tree(env.source, env.destination)
    p = env.prefix
    objects = env.objects()
    index = index_of(env)
    folders = {f["name"]: f for f in index["folders"]}

    # Original objects: the folder index holds the real names; each folder has its _List.txt.
    listed = env.get(f"{p}_index/folder_list.txt").decode().split("\n")
    assert sorted(listed) == sorted(n for n in folders if n)
    assert "" in folders and folders[""]["stem"] == "~root"
    assert folders[""]["files"] == 3 and folders[""]["large"] == 1  # files directly in SOURCE
    stems = [f["stem"] for f in index["folders"]]
    assert len(set(stems)) == len(stems)
    assert folders["A B"]["stem"] != folders["A_B"]["stem"]
    assert folders["X_unzip"]["stem"] != "X_unzip"  # would share a _progress key with X
    assert f"{p}{folders['Photos']['stem']}_List.txt" in objects
    photos_list = env.get(f"{p}Photos_List.txt").decode().split("\n")
    assert len(photos_list) == 25
    # Split by count (25 files, 10 per part) and by bytes (6 x 200 kB, 1 GB/1000 per part).
    assert [x["name"] for x in folders["Photos"]["part_table"]] == ["Part1", "Part2", "Part3"]
    assert [x["files"] for x in folders["Big"]["part_table"]] == [5, 1]
    for name in ("Part1", "Part2", "Part3"):
        assert f"{p}Photos_{name}.zip" in objects
    assert f"{p}Backup.zip_Full.zip" in objects
    large = json.loads(env.get(f"{p}Big_LargeFiles.json"))
    assert large == [{"path": "huge one.bin", "size": 600_000, "size_gb": 0.0}]
    assert f"{p}Photos 2020_LargeFiles.json".replace(" ", "_") not in objects

    # The original progress records, for tools that read the original layout.
    assert json.loads(env.get(f"{p}_progress/Photos_progress.json"))["folder_complete"] is True
    assert json.loads(env.get(f"{p}_progress/Photos_unzip_progress.json"))["folder_complete"] is True
    assert json.loads(env.get(f"{p}_progress/Photos_mapper_progress.json"))["normal_files"] == 25

    # Every file of the map was matched at DESTINATION, by MD5 for the local destination.
    report = json.load(open(os.path.join(env.vars["WORK_DIR"], "reports", "latest.json")))
    assert report["totals"]["verified"] == len(index["folders"])
    assert report["totals"]["files_verified"] == tree["files"]
    by_hash = sum(f.get("matched_by_hash", 0) for f in report["folders"])
    assert by_hash == tree["files"] - 2  # the two large files are checked by size at copy time
    assert "verified" in unzipper.stdout

    # A second full run changes nothing and uploads no part again.
    before = {k: v for k, v in env.objects().items()}
    run_all(env)
    after = env.objects()
    for key, meta in before.items():
        if key.endswith(".zip") or "/_parts/" in key or "/_map/" in key or "/_restored/" in key:
            assert after.get(key) == meta, f"{key} was rewritten by the second run"
    new_keys = set(after) - set(before)
    assert all("/_reports/" in k or "/_status/" in k for k in new_keys), sorted(new_keys)
    assert_same_tree(env.source, env.destination)


def test_manifest_records_every_file_with_its_part(env):
    make_tree(env.source, small_files=12)
    env.run("master_mapper.py").check_returncode()
    p = env.prefix
    key = [k for k in env.objects() if "/_map/g000001/folders/Photos.jsonl.gz" in k][0]
    rows = [json.loads(line) for line in gzip.decompress(env.get(key)).splitlines()]
    header, entries = rows[0], rows[1:]
    assert header["type"] == "folder" and header["name"] == "Photos" and header["files"] == 12
    assert all(e["t"] == "f" and e["part"] in ("Part1", "Part2") and e["s"] >= 1 and e["m"] for e in entries)
    assert [e["p"] for e in entries] == sorted(e["p"] for e in entries)
    deep = [json.loads(line) for line in gzip.decompress(
        env.get(key.replace("Photos.jsonl.gz", "Deep.jsonl.gz"))).splitlines()]
    assert {"t": "d", "p": "empty/nested/twice"} in deep[1:]
    assert any(e.get("s") == 0 for e in deep[1:])
    assert f"{p}_index/folder_list.txt" in env.objects()


def test_unzipper_before_zipper_waits_then_completes(env):
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    early = env.run("python_unzipper.py")
    assert early.returncode == 4, early.stderr[-3000:]
    assert "wait" in early.stderr
    assert env.run("python_zipper.py").returncode == 0
    late = env.run("python_unzipper.py")
    assert late.returncode == 0, late.stderr[-3000:]
    assert_same_tree(env.source, env.destination)


def test_zipper_without_a_map_says_run_the_mapper(env):
    proc = env.run("python_zipper.py")
    assert proc.returncode == 4
    assert "master_mapper.py" in proc.stderr


def test_source_changed_after_mapping_is_reported_by_path(env):
    make_tree(env.source, small_files=12)
    assert env.run("master_mapper.py").returncode == 0
    os.remove(os.path.join(env.source, "Photos", "img_003.jpg"))
    with open(os.path.join(env.source, "Photos", "img_007.jpg"), "ab") as fh:
        fh.write(b"more bytes")
    zipper = env.run("python_zipper.py")
    assert zipper.returncode == 3, zipper.stderr[-3000:]
    assert "img_003.jpg" in zipper.stderr and "deleted at SOURCE" in zipper.stderr
    assert "img_007.jpg" in zipper.stderr and "changed at SOURCE" in zipper.stderr
    unzipper = env.run("python_unzipper.py")
    assert unzipper.returncode == 3
    problems = differences(env.source, env.destination)
    assert problems == ["missing at DESTINATION: 'Photos/img_007.jpg'"], problems
    assert "img_003.jpg" in unzipper.stderr  # missing at DESTINATION, named


def test_sources_and_destination_as_rclone_remotes(env, tmp_path):
    """SOURCE and DESTINATION as S3 remotes of rclone (hashes recorded by the mapper)."""
    s3 = env.s3
    for b in ("src-" + env.bucket, "dst-" + env.bucket):
        s3.create_bucket(Bucket=b)
    remote = {
        "RCLONE_CONFIG_HUB_TYPE": "s3", "RCLONE_CONFIG_HUB_PROVIDER": "Other",
        "RCLONE_CONFIG_HUB_ENDPOINT": env.endpoint, "RCLONE_CONFIG_HUB_ACCESS_KEY_ID": env.vars["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_HUB_SECRET_ACCESS_KEY": env.vars["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_HUB_REGION": "us-east-1", "RCLONE_CONFIG_HUB_FORCE_PATH_STYLE": "true",
    }
    env.vars.update(remote)
    local = str(tmp_path / "local-tree")
    make_tree(local, small_files=12)
    subprocess.run([env.vars["RCLONE_BIN"], "copy", local, f"hub:src-{env.bucket}/tree"],
                   env=env.vars, check=True, capture_output=True)
    env.vars["SOURCE"] = f"hub:src-{env.bucket}/tree"
    env.vars["DESTINATION"] = f"hub:dst-{env.bucket}/out"
    run_all(env)
    index = index_of(env)
    key = [k for k in env.objects() if k.endswith("folders/Photos.jsonl.gz")][0]
    rows = [json.loads(line) for line in gzip.decompress(env.get(key)).splitlines()[1:]]
    assert all(r.get("h", {}).get("md5") for r in rows), "the mapper did not record SOURCE's MD5"
    back = str(tmp_path / "back")
    subprocess.run([env.vars["RCLONE_BIN"], "copy", f"hub:dst-{env.bucket}/out", back],
                   env=env.vars, check=True, capture_output=True)
    # S3 holds no empty directories; everything else must be identical.
    problems = [p for p in differences(local, back) if not p.endswith("/'")]
    assert not problems, problems
    assert index["totals"]["files"] > 0
