"""Bad data on S3: malformed records, unsafe zip entries, zip bombs and damaged parts."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import zipfile

import pytest


pytestmark = pytest.mark.e2e


def small_tree(root: str) -> None:
    for rel, data in [("X/x.txt", b"x" * 11), ("Unicode/日本語のファイル.txt", b"u" * 7)] + [
            (f"Photos/img_{i:03d}.jpg", os.urandom(300 + i)) for i in range(12)]:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)


def zipped(env) -> None:
    small_tree(env.source)
    for script in ("master_mapper.py", "python_zipper.py"):
        proc = env.run(script)
        assert proc.returncode == 0, proc.stderr[-3000:]


def record_key(env, stem: str, part: str) -> str:
    return f"{env.prefix}_parts/{stem}/{part}.json"


def replace_part(env, stem: str, part: str, members: list[tuple[str, bytes]], *,
                 entries_override: list[dict] | None = None) -> None:
    """Put a hand-made zip in place of a part, with a record and entries consistent with it."""
    buf = io.BytesIO()
    entries = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2001, 9, 9, 1, 46, 40))
            with zf.open(info, "w") as dst:
                dst.write(data)
            entries.append({"path": name, "offset": info.header_offset, "size": len(data),
                            "crc32": f"{info.CRC:08x}", "md5": hashlib.md5(data).hexdigest(),
                            "mtime": "2001-09-09T01:46:40Z"})
    body = buf.getvalue()
    key = f"{env.prefix}{stem}_{part}.zip"
    env.put(key, body)
    entries = entries_override or entries
    raw = gzip.compress(b"".join(json.dumps(e).encode() + b"\n" for e in entries))
    record = json.loads(env.get(record_key(env, stem, part)))
    env.put(record["entries_key"], raw)
    record.update(size=len(body), sha256=hashlib.sha256(body).hexdigest(),
                  etag=hashlib.md5(body).hexdigest(), entries_sha256=hashlib.sha256(raw).hexdigest())
    env.s3.delete_object(Bucket=env.bucket, Key=record_key(env, stem, part))
    env.put(record_key(env, stem, part), json.dumps(record).encode())


def nothing_outside(env, name: str) -> None:
    for root in (env.tmp, os.path.dirname(env.tmp)):
        for dirpath, _dirs, files in os.walk(root):
            if dirpath.startswith(env.source):
                continue
            assert name not in files, f"{name} was written to {dirpath}"


def test_flipped_byte_in_a_part_is_detected_and_not_restored(env):
    zipped(env)
    key = f"{env.prefix}Photos_Part1.zip"
    body = bytearray(env.get(key))
    body[len(body) // 3] ^= 0x01
    env.put(key, bytes(body))
    proc = env.run("python_unzipper.py")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert key in proc.stderr and "damaged" in proc.stderr
    assert not os.path.exists(os.path.join(env.destination, "Photos", "img_000.jpg"))
    assert f"{env.prefix}_restored/Photos/Part1.json" not in env.objects()
    # Every other folder was restored.
    assert os.path.exists(os.path.join(env.destination, "Unicode", "日本語のファイル.txt"))


def flip_at_rest(env, key: str, offset: int) -> None:
    """Flip one byte of the object as the server keeps it, its ETag left as it was: damage on
    the server's disk, which neither the ETag nor the size tells."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    stored = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(env.bucket, key)
    body = bytearray(stored.value)
    body[offset] ^= 0x01
    stored.value = bytes(body)


@pytest.mark.parametrize("spot, found_by", [("file data", "CRC-32"), ("central directory", "SHA-256")])
def test_byte_flipped_at_rest_is_refused_before_any_file_is_restored(env, spot, found_by):
    zipped(env)
    key = f"{env.prefix}Photos_Part1.zip"
    record = json.loads(env.get(record_key(env, "Photos", "Part1")))
    etag = env.objects()[key]["ETag"]
    body = env.get(key)
    if spot == "file data":  # inside the first file's bytes, past its local header
        first = json.loads(gzip.decompress(env.get(record["entries_key"])).splitlines()[0])["offset"]
        names, extra = struct.unpack("<HH", body[first + 26:first + 30])
        offset = first + 30 + names + extra + 5
    else:
        offset = body.rindex(b"PK\x01\x02") + 12  # the last entry's DOS time in the central directory
    flip_at_rest(env, key, offset)
    assert env.get(key) != body and env.objects()[key]["ETag"] == etag == f'"{record["etag"]}"'
    proc = env.run("python_unzipper.py")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert key in proc.stderr and "damaged" in proc.stderr and found_by in proc.stderr, proc.stderr[-3000:]
    for i in range(10):  # the files of Part1: none left staging
        assert not os.path.exists(os.path.join(env.destination, "Photos", f"img_{i:03d}.jpg"))
    assert f"{env.prefix}_restored/Photos/Part1.json" not in env.objects()
    assert os.path.exists(os.path.join(env.destination, "Unicode", "日本語のファイル.txt"))


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil-absolute.txt", "a/../../evil.txt"])
def test_unsafe_entry_refuses_the_part(env, evil):
    zipped(env)
    replace_part(env, "X", "Full", [("x.txt", b"fine"), (evil, b"evil bytes")])
    proc = env.run("python_unzipper.py")
    assert proc.returncode == 3
    assert "X_Full.zip" in proc.stderr and repr(evil) in proc.stderr
    nothing_outside(env, os.path.basename(evil))
    assert not os.path.exists("/tmp/evil-absolute.txt")
    assert not os.path.exists(os.path.join(env.destination, "X", "x.txt")), "part was partly restored"


def test_entry_names_that_lie_about_the_zip_are_refused(env):
    """The entries file says 'x.txt' but the zip holds '../evil.txt' at that offset."""
    zipped(env)
    replace_part(env, "X", "Full", [("../evil.txt", b"evil bytes")],
                 entries_override=[{"path": "x.txt", "offset": 0, "size": 10, "crc32": "0",
                                    "md5": hashlib.md5(b"evil bytes").hexdigest(), "mtime": ""}])
    proc = env.run("python_unzipper.py")
    assert proc.returncode == 3
    assert "X_Full.zip" in proc.stderr
    nothing_outside(env, "evil.txt")


def test_zip_bomb_is_refused_before_extraction(env):
    zipped(env)
    replace_part(env, "X", "Full", [("x.txt", b"tiny")],
                 entries_override=[{"path": "x.txt", "offset": 0, "size": 10**12, "crc32": "0",
                                    "md5": "0" * 32, "mtime": ""}])
    proc = env.run("python_unzipper.py", MAX_ZIP_BOMB_RATIO="100")
    assert proc.returncode == 3
    assert "MAX_ZIP_BOMB_RATIO" in proc.stderr and "X_Full.zip" in proc.stderr


@pytest.mark.parametrize("target", ["part record", "manifest", "index"])
def test_malformed_record_names_the_key_and_is_left_alone(env, target):
    zipped(env)
    keys = env.objects()
    key = {"part record": record_key(env, "Photos", "Part2"),
           "manifest": [k for k in keys if k.endswith("/folders/Photos.jsonl.gz")][0],
           "index": [k for k in keys if k.endswith("/index.json")][0]}[target]
    garbage = b"{not json" if target != "manifest" else b"\x1f\x8b garbage"
    env.put(key, garbage)
    proc = env.run("python_unzipper.py")
    assert proc.returncode in (1, 3), proc.stderr[-3000:]
    assert key in proc.stderr and "malformed" in proc.stderr
    assert env.get(key) == garbage, "the malformed record was overwritten"
    if target != "index":
        # The rest of the migration went on.
        assert os.path.exists(os.path.join(env.destination, "Unicode", "日本語のファイル.txt"))
