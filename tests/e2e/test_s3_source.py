"""End to end: an S3-backed SOURCE is mapped without a request per object (its listing's
LastModified), and yet DESTINATION gets each file's own mtime (rclone's X-Amz-Meta-Mtime, or
LastModified for an object without it), and a delta pass moves exactly the object that changed."""

from __future__ import annotations

import gzip
import json
import os
import subprocess

import pytest

from faultproxy import FaultProxy

pytestmark = pytest.mark.e2e

BASE = 1_600_000_000  # 2020-09-13: far from any upload time, so LastModified never passes for it


def write(path: str, body: bytes, mtime_s: float) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(body)
    ns = int(mtime_s * 1e9)
    os.utime(path, ns=(ns, ns))


def run(env, script: str, **extra) -> subprocess.CompletedProcess:
    proc = env.run(script, **extra)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def latest(env, suffix: str) -> list[str]:
    return sorted(k for k in env.objects() if k.endswith(suffix) and "/_map/" in k)


@pytest.fixture
def s3_source(env, tmp_path):
    """SOURCE as an rclone S3 remote (RCLONE_CONFIG_SRCS3_*) on the moto server, reached through a
    counting proxy; 24 files uploaded by ``rclone copy`` (mtime metadata), one large, and one
    object put by boto3 without it. Yields (proxy, local tree, bucket)."""
    bucket = "src-" + env.bucket
    env.s3.create_bucket(Bucket=bucket)
    local = str(tmp_path / "tree")
    for i in range(24):
        folder = ("Docs", "Photos/2020", "Music")[i % 3]
        write(os.path.join(local, folder, f"f{i:02d}.txt"), f"file {i} ".encode() * (i + 1), BASE + 3600 * i + 0.25)
    write(os.path.join(local, "top.txt"), b"at the top", BASE - 86400)
    write(os.path.join(local, "Music", "big.bin"), os.urandom(600_000), BASE + 7 * 86400)  # > 0.0005 GB
    with FaultProxy(env.endpoint, rate=0.0) as proxy:
        env.vars.update({
            "RCLONE_CONFIG_SRCS3_TYPE": "s3", "RCLONE_CONFIG_SRCS3_PROVIDER": "Other",
            "RCLONE_CONFIG_SRCS3_ENDPOINT": proxy.endpoint,
            "RCLONE_CONFIG_SRCS3_ACCESS_KEY_ID": env.vars["AWS_ACCESS_KEY_ID"],
            "RCLONE_CONFIG_SRCS3_SECRET_ACCESS_KEY": env.vars["AWS_SECRET_ACCESS_KEY"],
            "RCLONE_CONFIG_SRCS3_REGION": "us-east-1", "RCLONE_CONFIG_SRCS3_FORCE_PATH_STYLE": "true",
            "SOURCE": f"srcs3:{bucket}/tree",
        })
        subprocess.run([env.vars["RCLONE_BIN"], "copy", local, f"srcs3:{bucket}/tree"], env=env.vars,
                       check=True, capture_output=True)
        env.s3.put_object(Bucket=bucket, Key="tree/Docs/from-boto3.txt", Body=b"no mtime metadata")
        yield proxy, local, bucket


def source_mtimes(env, local: str, bucket: str) -> dict[str, float]:
    """Each file's own mtime at SOURCE: the local tree's, LastModified for the boto3 object."""
    out = {}
    for dirpath, _dirs, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, local)] = os.stat(path).st_mtime
    head = env.s3.head_object(Bucket=bucket, Key="tree/Docs/from-boto3.txt")
    out["Docs/from-boto3.txt"] = head["LastModified"].timestamp()
    return out


def destination_mtimes(env) -> dict[str, float]:
    out = {}
    for dirpath, _dirs, files in os.walk(env.destination):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, env.destination)
            if not rel.startswith(".python_unzipper"):
                out[rel] = os.stat(path).st_mtime
    return out


def test_s3_source_is_listed_without_a_head_per_object_and_keeps_real_mtimes(env, s3_source):
    proxy, local, bucket = s3_source
    before = dict(proxy.by_method)
    mapper = run(env, "master_mapper.py")
    heads = proxy.by_method.get("HEAD", 0) - before.get("HEAD", 0)
    gets = proxy.by_method.get("GET", 0) - before.get("GET", 0)
    # One HEAD per rclone command (rclone asks whether the root it is given names an object):
    # backend features, the top-level listing, the four folder units; none for the 26 objects.
    assert heads <= 6, f"the mapper sent {heads} HEAD requests to SOURCE\n{mapper.stderr[-3000:]}"
    assert gets < 10, f"the mapper sent {gets} GET requests to SOURCE (listings only expected)"
    assert "S3-backed" in mapper.stderr
    manifest = latest(env, "folders/Docs.jsonl.gz")[-1]
    header = json.loads(gzip.decompress(env.get(manifest)).splitlines()[0])
    assert header["version"] == 2 and header["mtime_kind"] == "server", header
    run(env, "python_zipper.py")
    run(env, "python_unzipper.py")

    want, got = source_mtimes(env, local, bucket), destination_mtimes(env)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    off = {p: (got[p], want[p]) for p in want if abs(got[p] - want[p]) > 0.001}
    assert not off, off  # metadata mtimes to the millisecond, the boto3 object's LastModified
    for rel in want:
        with open(os.path.join(env.destination, rel), "rb") as a:
            body = a.read()
        expected = env.s3.get_object(Bucket=bucket, Key="tree/" + rel)["Body"].read()
        assert body == expected, rel

    # One object changes, same size, new mtime: a FORCE_RESCAN pass moves exactly that one.
    changed = os.path.join(local, "Docs", "f03.txt")
    with open(changed, "rb") as fh:
        size = len(fh.read())
    write(changed, b"X" * size, BASE + 30 * 86400)
    subprocess.run([env.vars["RCLONE_BIN"], "copyto", changed, f"srcs3:{bucket}/tree/Docs/f03.txt"],
                   env=env.vars, check=True, capture_output=True)
    before = dict(proxy.by_method)
    run(env, "master_mapper.py", FORCE_RESCAN="1")
    assert proxy.by_method.get("HEAD", 0) - before.get("HEAD", 0) <= 6
    index = json.loads(env.get(latest(env, "/index.json")[-1]))
    c = index["changes"]
    assert (c["changed"], c["added"], c["deleted"]) == (1, 0, 0), c
    docs = [f for f in index["folders"] if f["name"] == "Docs"][0]
    assert [p["files"] for p in docs["parts"]] == [1], docs["parts"]
    assert all(not f["parts"] for f in index["folders"] if f["name"] != "Docs")
    run(env, "python_zipper.py")
    run(env, "python_unzipper.py")
    with open(os.path.join(env.destination, "Docs", "f03.txt"), "rb") as fh:
        assert fh.read() == b"X" * size
    want, got = source_mtimes(env, local, bucket), destination_mtimes(env)
    off = {p: (got[p], want[p]) for p in want if abs(got[p] - want[p]) > 0.001}
    assert not off, off
