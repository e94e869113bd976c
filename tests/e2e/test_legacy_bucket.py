"""A bucket the original scripts wrote (Info-ZIP parts, _List.txt, progress JSON) restores byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import unicodedata

import pytest

from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


def original_stem(name: str) -> str:
    """The original scripts' sanitize_name, written out independently of common_s3."""
    if not name.isascii():
        name = unicodedata.normalize("NFC", name)
    return urllib.parse.quote(name, safe="").replace("%20", "_").replace("%2F", "_")


def write_tree(root: str) -> dict[str, list[str]]:
    layout = {
        "Docs": [f"report {i}.txt" for i in range(4)] + ["sub dir/deep/notes.md", "#hash.txt"],
        "Photos 2020": [f"img_{i:02d}.jpg" for i in range(7)],
        "Photos": ["only.jpg"],  # its stem is a prefix of Photos_2020's keys (original flaw A1)
        "Backup.zip": ["a.bin", "b.bin", "c.bin"],
        "Café": ["menu.txt"],
    }
    for n, (folder, files) in enumerate(layout.items()):
        for i, rel in enumerate(files):
            path = os.path.join(root, folder, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(os.urandom(200 + 37 * i + n))
            os.utime(path, (1_100_000_000 + 3600 * i + n, 1_100_000_000 + 3600 * i + n))
    return layout


def zip_batch(source_folder: str, files: list[str], out: str, tmp: str) -> None:
    """What the original zipper did: copy the batch into a temporary folder, then `zip -0 -r -q`."""
    batch = os.path.join(tmp, "temp_batch")
    if os.path.exists(out):
        os.remove(out)  # zip -r adds to an existing archive (original flaw D8)
    shutil.rmtree(batch, ignore_errors=True)
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(batch, rel)), exist_ok=True)
        shutil.copy2(os.path.join(source_folder, rel), os.path.join(batch, rel))
    subprocess.run(["zip", "-0", "-r", "-q", out, "."], cwd=batch, check=True)
    shutil.rmtree(batch)


def test_bucket_written_by_the_original_scripts_restores_byte_for_byte(env):
    layout = write_tree(env.source)
    p = env.prefix
    env.put(f"{p}_index/folder_list.txt", "\n".join(layout).encode())
    work = os.path.join(env.tmp, "legacy")
    os.makedirs(work)
    for folder, files in layout.items():
        stem = original_stem(folder)
        env.put(f"{p}{stem}_List.txt", "\n".join(files).encode())
        # Batches as the original made them: Full, or Part1..N of 3 files, the last one split in two.
        batches = [files] if len(files) <= 3 else [files[i:i + 3] for i in range(0, len(files), 3)]
        keys = []
        for n, batch in enumerate(batches, 1):
            base = f"{p}{stem}_Full.zip" if len(batches) == 1 else f"{p}{stem}_Part{n}.zip"
            chunks = [batch] if n < len(batches) or len(batch) < 2 else [batch[:1], batch[1:]]
            for m, chunk in enumerate(chunks):
                key = base if m == 0 else base.replace(".zip", "") + f"_Split{m}.zip"
                out = os.path.join(work, f"{stem}-{n}-{m}.zip")
                zip_batch(os.path.join(env.source, folder), chunk, out, work)
                env.put(key, open(out, "rb").read())
                keys.append(key)
        env.put(f"{p}_progress/{stem}_progress.json", json.dumps(
            {"completed_keys": keys, "completed_files": files, "large_files_done": [],
             "folder_complete": True}, indent=2).encode())
    # The original naming deleted every ".zip" from split keys: Backup.zip's split is Backup_Part..._Split1.
    assert f"{p}Backup_Full_Split1.zip" in env.objects()

    proc = env.run("python_unzipper.py")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bucket written by the original scripts" in proc.stderr
    assert_same_tree(env.source, env.destination)  # nothing of "Photos 2020" landed in "Photos"
    report = json.load(open(os.path.join(env.vars["WORK_DIR"], "reports", "latest.json")))
    assert report["totals"]["verified"] == len(layout)
    # A second run restores nothing again, and --verify agrees.
    again = env.run("python_unzipper.py")
    assert again.returncode == 0 and "original part restored" not in again.stderr
    assert env.run("python_unzipper.py", "--verify").returncode == 0
    # A file missing at DESTINATION is found by --verify against _List.txt.
    os.remove(os.path.join(env.destination, "Docs", "report 2.txt"))
    missing = env.run("python_unzipper.py", "--verify")
    assert missing.returncode == 3 and "report 2.txt" in missing.stderr


def test_original_folder_not_complete_in_its_zipper_progress_waits(env):
    write_tree(env.source)
    p = env.prefix
    env.put(f"{p}_index/folder_list.txt", b"Docs")
    files = sorted(os.listdir(os.path.join(env.source, "Docs")))
    files = [f for f in files if os.path.isfile(os.path.join(env.source, "Docs", f))]
    env.put(f"{p}Docs_List.txt", "\n".join(files).encode())
    out = os.path.join(env.tmp, "docs.zip")
    zip_batch(os.path.join(env.source, "Docs"), files[:2], out, env.tmp)
    env.put(f"{p}Docs_Part1.zip", open(out, "rb").read())
    env.put(f"{p}_progress/Docs_progress.json", json.dumps({"completed_keys": [f"{p}Docs_Part1.zip"]}).encode())
    proc = env.run("python_unzipper.py")
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(env.destination, "Docs", files[0]))
