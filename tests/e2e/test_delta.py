"""Delta passes (cutover): FORCE_RESCAN=1 maps SOURCE again as a new generation, and the zipper
and unzipper then move only the difference; deletions at SOURCE are reported, and propagated
only with PROPAGATE_DELETES=1 and only where DESTINATION's copy is still what was restored.

The real scripts as subprocesses, real rclone, moto's S3 server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import zipfile

import pytest

from e2ekit import kill_at
from treecheck import assert_same_tree, differences, snapshot

pytestmark = pytest.mark.e2e

SCRIPTS = ("master_mapper.py", "python_zipper.py", "python_unzipper.py")
T0 = 1_700_000_000  # mtimes of the first pass, whole seconds


def write(root: str, rel: str, data: bytes, mtime: float) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    os.utime(path, (mtime, mtime))


def first_tree(src: str) -> None:
    for i in range(12):  # two parts of A (SPLIT_THRESHOLD=10)
        write(src, f"A/a{i:02d}.txt", f"a{i} ".encode() * 300, T0 + i)
    write(src, "A/sub/deep.txt", b"deep " * 100, T0)
    write(src, "A/big.bin", bytes(range(256)) * 2400, T0)  # 614,400 bytes: a large file
    os.makedirs(os.path.join(src, "A/emptydir"))
    for i in range(3):
        write(src, f"B/b{i}.txt", f"b{i} ".encode() * 200, T0 + i)
    write(src, "C/c1.txt", b"c1" * 500, T0)
    write(src, "C/c2.txt", b"c2" * 500, T0)
    write(src, "D/d1.txt", b"d1" * 400, T0)
    write(src, "D/sub/d2.txt", b"d2" * 400, T0)
    write(src, "R/r1.txt", b"r1" * 300, T0)
    write(src, "root1.txt", b"root one" * 50, T0)
    write(src, "rootbig.bin", b"\x01" * 600_000, T0)  # a large file that never changes


def change_tree(src: str) -> tuple[set[str], set[str]]:
    """Every kind of change between two passes; returns (paths deleted at SOURCE, small files
    whose bytes the second pass must send)."""
    t1 = T0 + 10_000
    write(src, "A/new1.txt", b"new in A " * 100, t1)                     # added
    write(src, "N/n1.txt", b"new folder " * 100, t1)                     # added, in a new folder
    write(src, "root2.txt", b"new at the root " * 40, t1)                # added, directly in SOURCE
    old = open(os.path.join(src, "A/a00.txt"), "rb").read()
    write(src, "A/a00.txt", old.upper(), t1)                             # same size, new bytes and mtime
    write(src, "A/a01.txt", b"longer now " * 400, t1)                     # new size
    write(src, "A/big.bin", bytes(reversed(range(256))) * 2400, t1)     # a large file changed
    os.remove(os.path.join(src, "A/a02.txt"))                            # deleted
    os.remove(os.path.join(src, "B/b0.txt"))                             # deleted
    os.rename(os.path.join(src, "B/b1.txt"), os.path.join(src, "B/b1-renamed.txt"))  # renamed file
    os.rename(os.path.join(src, "R"), os.path.join(src, "R2"))           # renamed folder
    os.remove(os.path.join(src, "C/c1.txt"))                             # folder emptied
    os.remove(os.path.join(src, "C/c2.txt"))
    shutil.rmtree(os.path.join(src, "D"))                                # folder deleted
    os.rmdir(os.path.join(src, "A/emptydir"))                            # empty directory removed
    os.makedirs(os.path.join(src, "B/newempty"))                         # empty directory added
    deleted = {"A/a02.txt", "B/b0.txt", "B/b1.txt", "R/r1.txt", "C/c1.txt", "C/c2.txt", "D/d1.txt",
               "D/sub/d2.txt"}
    sent = {"A/new1.txt", "N/n1.txt", "root2.txt", "A/a00.txt", "A/a01.txt", "B/b1-renamed.txt", "R2/r1.txt"}
    return deleted, sent


def run_pass(env, *, rescan: bool, **extra: str) -> None:
    for script in SCRIPTS:
        more = {"FORCE_RESCAN": "1"} if rescan and script == "master_mapper.py" else {}
        proc = env.run(script, **more, **extra)
        assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stderr[-4000:]}"


def zip_objects(objects: dict) -> dict[str, int]:
    return {k: v["Size"] for k, v in objects.items() if k.endswith(".zip")}


def zip_entries(env, keys) -> dict[str, int]:
    """{folder-relative entry name: size} of every entry of these zip objects."""
    out = {}
    for key in keys:
        with zipfile.ZipFile(io.BytesIO(env.get(key))) as zf:
            folder = key[len(env.prefix):].split("_Part")[0].split("_Full")[0]
            for info in zf.infolist():
                out[f"{folder}/{info.filename}" if not folder.startswith("~root") else info.filename] = info.file_size
    return out


def latest_index(env) -> dict:
    keys = sorted(k for k in env.objects() if k.endswith("/index.json") and "/_map/" in k)
    return json.loads(env.get(keys[-1]))


def report(env) -> dict:
    with open(os.path.join(env.vars["WORK_DIR"], "reports", "latest.json")) as fh:
        return json.load(fh)


def deleted_in_report(rep: dict, key: str) -> set[str]:
    out = set()
    for f in rep["folders"] + rep.get("removed_folders", []):
        summary = f.get("deleted_at_source") or {}
        for item in summary.get(key) or []:
            path = item["path"] if isinstance(item, dict) else item
            out.add(f"{f['folder']}/{path}" if f["folder"] else path)
    return out


def test_delta_passes_move_only_the_difference_and_delete_only_when_asked(env):
    src, dst = env.source, env.destination
    first_tree(src)
    run_pass(env, rescan=False)
    assert_same_tree(src, dst)
    after_first = env.objects()

    # --- second pass: every kind of change at SOURCE ---------------------------------------------
    deleted, sent = change_tree(src)
    run_pass(env, rescan=True)
    after_second = env.objects()

    index = latest_index(env)
    assert index["generation"] == 2 and index["previous"] == 1
    c = index["changes"]
    assert (c["added"], c["changed"], c["deleted"]) == (5, 3, 8), c  # changed: a00, a01, big.bin
    assert sorted(c["folders_added"]) == ["N", "R2"] and sorted(c["folders_removed"]) == ["D", "R"]
    assert (c["dirs_added"], c["dirs_removed"]) == (1, 1), c  # B/newempty; A/emptydir (C is a folder)
    # Folder A (13 small files in Part1 and Part2): its two changed and one added file go into
    # one new small part; its old parts are kept, not made again.
    folders = {f["name"]: f for f in index["folders"]}
    assert [(p["name"], p["files"]) for p in folders["A"]["parts"]] == [("Part3", 3)]
    assert [p["name"] for p in folders["B"]["parts"]] == ["Part2"]  # B was Full: numbering goes on
    # Earlier generations are kept as they were.
    assert {k: v["ETag"] for k, v in after_first.items() if "/_map/g000001/" in k} == \
        {k: v["ETag"] for k, v in after_second.items() if "/_map/g000001/" in k}

    # Only the difference moved: new parts hold exactly the added and changed small files; no
    # part of the first pass was rewritten; the changed large file was copied again, the other not.
    new_zips = set(zip_objects(after_second)) - set(zip_objects(after_first))
    assert all(after_second[k]["ETag"] == after_first[k]["ETag"] for k in zip_objects(after_first))
    entries = zip_entries(env, sorted(new_zips))
    assert set(entries) == sent, sorted(entries)
    sent_bytes = sum(os.path.getsize(os.path.join(src, p)) for p in sent)
    assert sum(entries.values()) == sent_bytes
    first_bytes = sum(zip_objects(after_first).values())
    second_bytes = sum(after_second[k]["Size"] for k in new_zips)
    print(f"first pass: {len(zip_objects(after_first))} parts, {first_bytes} bytes; second pass: "
          f"{len(new_zips)} parts, {second_bytes} bytes ({sent_bytes} bytes of {len(sent)} files)")
    new_large = [k for k in set(after_second) - set(after_first) if "/_large/" in k]
    assert len(new_large) == 1, new_large

    # DESTINATION = the new SOURCE plus exactly the deleted files (deletions are never by default).
    s, d = snapshot(src), snapshot(dst)
    for path, entry in s.items():
        if entry[0] == "file":
            assert d.get(path) is not None and d[path][1] == entry[1] and d[path][3] == entry[3], path
            assert abs(d[path][2] - entry[2]) <= 1, path
        else:
            assert os.path.isdir(os.path.join(dst, path)), path
    assert {p for p, e in d.items() if e[0] == "file" and p not in s} == deleted
    rep = report(env)
    assert deleted_in_report(rep, "kept") == deleted
    assert not deleted_in_report(rep, "deleted")
    status = env.run("python_unzipper.py", "--status")
    assert status.returncode == 0, status.stderr
    assert "generation 2" in status.stdout and "8 deleted" in status.stdout, status.stdout

    # --- PROPAGATE_DELETES=1: deleted where DESTINATION still has what was restored --------------
    changed_here = os.path.join(dst, "B/b0.txt")
    with open(changed_here, "ab") as fh:
        fh.write(b" edited at DESTINATION after the restore")
    proc = env.run("python_unzipper.py", PROPAGATE_DELETES="1", MAX_DELETE="100%")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert differences(src, dst, ignore={"B/b0.txt"}) == []
    assert os.path.exists(changed_here)  # changed at DESTINATION since: reported, not deleted
    rep = report(env)
    assert deleted_in_report(rep, "deleted") == deleted - {"B/b0.txt"}
    assert deleted_in_report(rep, "changed_at_destination") == {"B/b0.txt"}
    for gone in ("D", "R", "A/emptydir"):
        assert not os.path.exists(os.path.join(dst, gone)), gone
    # Run again: nothing more to delete, nothing deleted twice.
    again = env.run("python_unzipper.py", PROPAGATE_DELETES="1", MAX_DELETE="100%")
    assert again.returncode == 0 and os.path.exists(changed_here), again.stderr[-2000:]

    # --- third pass, nothing changed: no part, no large copy, folders kept verified -------------
    os.remove(changed_here)
    run_pass(env, rescan=True)
    after_third = env.objects()
    assert latest_index(env)["generation"] == 3
    new_keys = set(after_third) - set(after_second)
    assert not [k for k in new_keys if k.endswith(".zip") or "/_parts/" in k or "/_large/" in k], sorted(new_keys)
    c = latest_index(env)["changes"]
    assert (c["added"], c["changed"], c["deleted"], c["dirs_added"], c["dirs_removed"]) == (0, 0, 0, 0, 0), c
    carried = [json.loads(env.get(k)) for k in new_keys if "/_verified/g000003/" in k]
    assert carried and all(v.get("carried_from") for v in carried)
    assert_same_tree(src, dst)


def test_delta_pass_killed_at_every_stage_then_finished_by_two_workers(env):
    """A delta pass, SOURCE and DESTINATION as rclone remotes and slowed down: each stage is
    killed with kill -9 once, then two workers of it (each its own WORK_DIR, claims on moto)
    finish it; DESTINATION ends equal to SOURCE, deletions propagated, no part written twice."""
    env.via_rclone()
    src, dst = env.source, env.destination
    first_tree(src)
    run_pass(env, rescan=False)
    change_tree(src)
    before = {k: v["ETag"] for k, v in env.objects().items() if k.endswith(".zip")}
    rng = random.Random(7)
    killed = []
    for script in SCRIPTS:
        extra = {"RCLONE_BWLIMIT": "300k", "PROPAGATE_DELETES": "1", "MAX_DELETE": "100%"}
        if script == "master_mapper.py":
            extra["FORCE_RESCAN"] = "1"
        # The mapper is killed once its new generation has begun (on a loaded machine 2 s may
        # pass before it writes the plan, and a kill before that leaves no delta pass to finish).
        begun = f"{env.prefix}_map/g000002/plan.json" if script == "master_mapper.py" else None
        if kill_at(env, script, rng.uniform(0.5, 2.0), after_key=begun, **extra) == -signal.SIGKILL:
            killed.append(script)
        extra.pop("RCLONE_BWLIMIT")
        if script == "master_mapper.py":
            # The killed mapper's generation is unfinished: the workers continue it (a FORCE_RESCAN
            # that found it complete would start a generation of its own, also right).
            extra.pop("FORCE_RESCAN")
        workers = [env.popen(script, **extra, WORK_DIR=os.path.join(env.tmp, f"work-{i}"),
                             LEASE_SECONDS="3") for i in range(2)]
        outs = [w.communicate(timeout=300) for w in workers]
        codes = [w.returncode for w in workers]
        assert codes == [0, 0], f"{script}: {codes}\n" + "\n".join(err[-3000:] for _out, err in outs)
    assert differences(src, dst) == []
    print("killed mid-run:", killed)
    assert len(killed) >= 2, killed
    after = {k: v["ETag"] for k, v in env.objects().items() if k.endswith(".zip")}
    assert all(after[k] == etag for k, etag in before.items()), "a part of the first pass was rewritten"
    assert len(after) > len(before)
