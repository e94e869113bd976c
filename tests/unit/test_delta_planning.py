"""Delta passes, in process: the mapper's difference between two listings of a folder, and the
unzipper's view of files deleted at SOURCE (which ones, and whether DESTINATION's copy is still
what was restored)."""

from __future__ import annotations

import gzip
import io
import json
from types import SimpleNamespace

import master_mapper
import python_unzipper
from common_s3 import FolderEntry, FolderIndex, IndexRecord, read_jsonl_gz

CFG = SimpleNamespace(split_threshold=10, max_zip_bytes=1 << 30)
M0, M1 = "2023-11-14T22:13:20Z", "2023-11-15T10:00:00Z"


def folder(tmp_path, name: str, rows) -> FolderIndex:
    index = FolderIndex(str(tmp_path / f"{name}.sqlite"))
    for row in rows:
        index.add(*row)
    index.commit()
    return index


def previous_listing(tmp_path) -> FolderIndex:
    return folder(tmp_path, "prev", [
        ("same.txt", "f", 10, M0, {"md5": "aa"}, "Part1", 1),
        ("new-bytes.txt", "f", 10, M0, {"md5": "bb"}, "Part1", 1),
        ("new-size.txt", "f", 10, M0, {}, "Part2", 1),
        ("gone.txt", "f", 7, M0, {"md5": "cc"}, "Part2", 1),
        ("big.bin", "l", 900, M0, {}, None, None),
        ("old-empty", "d"),
    ])


def test_difference_of_two_listings(tmp_path):
    prev = previous_listing(tmp_path)
    now = folder(tmp_path, "now", [
        ("same.txt", "f", 10, M0, {"md5": "aa"}),
        ("new-bytes.txt", "f", 10, M0, {"md5": "b2"}),  # same size and mtime, the source's hash differs
        ("new-size.txt", "f", 11, M1, {}),
        ("added.txt", "f", 5, M1, {}),
        ("big.bin", "l", 900, M0, {}),
        ("new-empty", "d"),
    ])
    path = str(tmp_path / "changes.gz")
    parts, next_part, counts = master_mapper.assign_new_parts(now, prev, 2, 3, CFG, path)
    assert [p["name"] for p in parts] == ["Part3"] and next_part == 4
    assert {r["path"]: r["part"] for r in now.rows("f")} == {
        "same.txt": "Part1", "new-bytes.txt": "Part3", "new-size.txt": "Part3", "added.txt": "Part3"}
    assert (counts["added"], counts["changed"], counts["deleted"], counts["unchanged"]) == (1, 2, 1, 2)
    assert (counts["dirs_added"], counts["dirs_removed"], counts["deleted_bytes"]) == (1, 1, 7)
    assert counts["new_folder"] is False
    with open(path, "rb") as fh:
        lines = {(line["op"], line["p"]): line for line in read_jsonl_gz(fh.read(), path)}
    assert set(lines) == {("added", "added.txt"), ("changed", "new-bytes.txt"), ("changed", "new-size.txt"),
                          ("deleted", "gone.txt"), ("dir_added", "new-empty"), ("dir_removed", "old-empty")}
    assert lines[("deleted", "gone.txt")]["was"] == {"t": "f", "s": 7, "m": M0, "h": {"md5": "cc"}, "part": "Part2"}
    assert lines[("changed", "new-size.txt")]["was"]["part"] == "Part2" and lines[("changed", "new-size.txt")]["s"] == 11


def test_unchanged_folder_has_no_new_part(tmp_path):
    prev = previous_listing(tmp_path)
    now = folder(tmp_path, "now", [(r["path"], r["kind"], r["size"], r["mtime"], r["hashes"]) for r in prev.rows()])
    parts, next_part, counts = master_mapper.assign_new_parts(now, prev, 2, 3, CFG, None)
    assert parts == [] and next_part == 3
    assert all(counts[k] == 0 for k in ("added", "changed", "deleted", "dirs_added", "dirs_removed"))


def changes_file(lines) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        for line in lines:
            gz.write(json.dumps(line).encode() + b"\n")
    return buf.getvalue()


class Store:
    def __init__(self, objects):
        self.objects = objects

    def get_bytes(self, key):
        return self.objects.get(key)


def was(size, part="Part1"):
    return {"t": "f", "s": size, "m": M0, "part": part}


def test_the_latest_deletion_of_a_path_wins_and_a_path_at_source_again_is_not_deleted(tmp_path):
    store = Store({
        "g2": changes_file([{"op": "deleted", "p": "x.txt", "was": was(1)},
                            {"op": "deleted", "p": "back.txt", "was": was(2)},
                            {"op": "dir_removed", "p": "d"}]),
        "g3": changes_file([{"op": "added", "p": "x.txt", "t": "f", "s": 3, "m": M1}]),
        "g4": changes_file([{"op": "deleted", "p": "x.txt", "was": was(3, "Part7")}]),
    })
    sources = [{"generation": g, "changes_key": f"g{g}", "name": "F"} for g in (4, 2, 3)]
    now = folder(tmp_path, "now", [("back.txt", "f", 2, M1, {})])
    deletions = python_unzipper.Deletions("F", sources).load(store, now)
    assert set(deletions.files) == {"x.txt"}
    assert deletions.files["x.txt"]["s"] == 3 and deletions.files["x.txt"]["part"] == "Part7"
    assert deletions.dirs == {"d"}


def test_an_unsafe_path_in_a_changes_file_is_refused(tmp_path):
    store = Store({"k": changes_file([{"op": "deleted", "p": "../etc/passwd", "was": was(1)}])})
    deletions = python_unzipper.Deletions("F", [{"generation": 2, "changes_key": "k", "name": "F"}])
    try:
        deletions.load(store, None)
    except python_unzipper.RecordError as exc:
        assert "k" in str(exc)
    else:
        raise AssertionError("an unsafe path was accepted")


def test_destination_copy_is_compared_with_what_was_restored():
    deletions = python_unzipper.Deletions("F", [])
    deletions.files = {"a": {"t": "f", "s": 5, "m": M0, "part": "Part1", "h": {"md5": "m5"}}}
    sums = {"a": ("m5", "0000abcd", M0)}
    assert deletions.differs("a", 5, M0, "0000abcd", "crc32", True, sums) is None
    assert "size" in deletions.differs("a", 6, M0, "0000abcd", "crc32", True, sums)
    assert "modification time" in deletions.differs("a", 5, M1, "0000abcd", "crc32", True, sums)
    assert "crc32" in deletions.differs("a", 5, M0, "ffffffff", "crc32", True, sums)
    assert "md5" in deletions.differs("a", 5, M0, "other", "md5", True, {})  # the map's MD5 when no part sums
    assert deletions.differs("a", 5, M1, None, None, False, {}) is None  # no hash, mtimes not comparable


def test_a_copy_mapped_with_s3_lastmodified_is_compared_with_the_mtime_the_zipper_recorded():
    deletions = python_unzipper.Deletions("F", [])
    # ``m`` is the object's LastModified (M1); the file's own mtime, from the part's entries, is M0.
    deletions.files = {"a": {"t": "f", "s": 5, "m": M1, "part": "Part1", "mtime_kind": "server"}}
    assert deletions.differs("a", 5, M0, None, None, True, {"a": (None, None, M0)}) is None
    assert "modification time" in deletions.differs("a", 5, M1, None, None, True, {"a": (None, None, M0)})
    # No recorded mtime: never taken as the same file (kept), unless DESTINATION keeps no mtimes.
    assert "not recorded" in deletions.differs("a", 5, M0, None, None, True, {})
    assert deletions.differs("a", 5, M0, None, None, False, {}) is None


def test_only_a_folder_with_no_change_of_any_kind_carries_its_verification():
    index = IndexRecord(generation=2, folders=[], totals={}, previous=1)

    def entry(changes):
        return FolderEntry(name="F", stem="F", changes=changes)
    zero = {"new_folder": False, "added": 0, "changed": 0, "deleted": 0, "dirs_added": 0, "dirs_removed": 0}
    assert python_unzipper.unchanged_since(entry(zero), index) == 1
    for key in ("added", "changed", "deleted", "dirs_added", "dirs_removed"):
        assert python_unzipper.unchanged_since(entry({**zero, key: 1}), index) is None
    assert python_unzipper.unchanged_since(entry({**zero, "new_folder": True}), index) is None
    assert python_unzipper.unchanged_since(entry(zero), IndexRecord(generation=1, folders=[], totals={})) is None
    old_map = {"added": 0, "changed": 0, "unchanged": 5, "deleted": 0}  # counted before directories were
    assert python_unzipper.unchanged_since(entry(old_map), index) is None
