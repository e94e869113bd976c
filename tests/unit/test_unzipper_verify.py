"""python_unzipper.finish_folder / verify_folder: DESTINATION compared with the map, with a
fake rclone (the listing is plain data) and the map and part records in moto."""

from __future__ import annotations

import errno
import hashlib
import os
import zlib

import pytest

import python_unzipper
from common_s3 import FolderEntry, Layout, RecordError, Run, Runtime, assign_stems, jsonl_gz_bytes, large_file_id, mtime_ns

MTIME = "2001-09-09T01:46:40Z"
FILES = {"a.txt": b"hello", "sub/b c.txt": b"second file", "日本/語.txt": b"unicode"}


class FakeRclone:
    """Records every command; ``lsjson`` answers with the given DESTINATION listing."""

    def __init__(self, listing: list[dict]):
        self.listing = listing
        self.calls: list[list[str]] = []

    def run_retried(self, args, *, what, **_kw):
        self.calls.append(list(args))

    def lsjson(self, path, flags, *, what, **_kw):
        self.calls.append(["lsjson", *flags, path])
        return iter(self.listing)


def listing(files=FILES, *, hashes=True, mtime=MTIME, dirs=("empty/dir",)) -> list[dict]:
    """As ``rclone lsjson -R`` lists it: the files, then every directory (parents included)."""
    every_dir = set()
    for path in [*files, *(d + "/x" for d in dirs)]:
        while "/" in path:
            path = path.rpartition("/")[0]
            every_dir.add(path)
    return [{"Path": p, "Size": len(d), "ModTime": mtime,
             **({"Hashes": {"md5": hashlib.md5(d).hexdigest()}} if hashes else {})}
            for p, d in files.items()] + [{"Path": d, "IsDir": True, "Size": -1, "ModTime": mtime}
                                          for d in sorted(every_dir)]


class Folder:
    """A one-part folder written to moto as the mapper and the zipper would leave it."""

    def __init__(self, records, name="F", *, files=FILES, dirs=("empty/dir",), larges=()):
        self.records = records
        self.layout = Layout("work_files_zips/")
        self.name = name
        self.stem = assign_stems([name])[name]
        header = {"type": "folder", "version": 1, "name": name, "stem": self.stem, "generation": 1}
        rows = [{"t": "f", "p": p, "s": len(d), "m": MTIME, "part": "Full", "g": 1} for p, d in files.items()]
        rows += [{"t": "d", "p": d} for d in dirs]
        rows += [{"t": "l", "p": p, "s": s, "m": MTIME} for p, s in larges]
        records.put_bytes(self.layout.manifest(1, self.stem), jsonl_gz_bytes([header, *rows]))
        entries = jsonl_gz_bytes([{"path": p, "offset": i * 100, "size": len(d),
                                   "md5": hashlib.md5(d).hexdigest(), "crc32": f"{zlib.crc32(d):08x}",
                                   "mtime": MTIME}
                                  for i, (p, d) in enumerate(files.items())])
        entries_key = self.layout.part_entries(self.stem, "Full")
        records.put_bytes(entries_key, entries)
        records.put_json(self.layout.part_record(self.stem, "Full"), {
            "key": self.layout.part_object(self.stem, "Full"), "size": 1000, "sha256": "0" * 64,
            "entries_key": entries_key, "entries_sha256": hashlib.sha256(entries).hexdigest()})
        self.table = FolderEntry(name=name, stem=self.stem, part_table=[{"name": "Full"}])

    def finish(self, cfg, rclone, *, features=None, larges_done=()):
        features = {"Hashes": ["md5"], "Precision": 1} if features is None else features
        ctx = Run(cfg, self.records, self.layout, rclone, Runtime())
        return python_unzipper.finish_folder(ctx, 1, self.table, set(larges_done), features)

    def verified(self):
        return self.records.get_json(self.layout.verified_record(1, self.stem))


@pytest.fixture
def cfg(make_cfg):
    cfg = make_cfg("unzipper")
    os.makedirs(cfg.tmp_dir)  # run_script makes it while holding the lock
    return cfg


@pytest.fixture
def folder(records):
    return Folder(records)


def test_matching_destination_is_verified(cfg, folder):
    rclone = FakeRclone(listing())
    report = folder.finish(cfg, rclone)
    assert report["state"] == "verified" and report["ok"]
    assert report["files"] == 3 and report["matched_by_hash"] == 3 and report["hash_kind"] == "md5"
    assert report["bytes"] == sum(len(d) for d in FILES.values())
    assert folder.verified()["files"] == 3
    assert rclone.calls[0][:2] == ["copy", "--create-empty-src-dirs"] and rclone.calls[0][-1] == "dst:F"
    assert rclone.calls[1][0] == "lsjson" and rclone.calls[1][-1] == "dst:F"
    assert rclone.calls[1][-4:-1] == ["--hash", "--hash-type", "md5"]
    assert "-R" in rclone.calls[1]
    progress = folder.records.get_json(folder.layout.legacy_progress(folder.stem, "unzipper"))
    assert progress["folder_complete"] is True


def test_missing_file_fails_the_folder(cfg, folder):
    files = dict(FILES)
    del files["sub/b c.txt"]
    report = folder.finish(cfg, FakeRclone(listing(files)))
    assert report["state"] == "failed"
    assert report["missing"] == ["sub/b c.txt"]
    assert folder.verified() is None


def test_size_difference_fails_the_folder(cfg, folder):
    entries = listing()
    entries[0]["Size"] += 1
    report = folder.finish(cfg, FakeRclone(entries))
    assert report["state"] == "failed"
    assert [d["path"] for d in report["differing"]] == ["a.txt"]
    assert "size" in report["differing"][0]["why"]


def test_md5_difference_fails_the_folder(cfg, folder):
    entries = listing()
    entries[2]["Hashes"]["md5"] = "0" * 32
    report = folder.finish(cfg, FakeRclone(entries))
    assert report["state"] == "failed"
    assert [d["path"] for d in report["differing"]] == ["日本/語.txt"]


def test_destination_without_hashes_matches_by_size(cfg, folder):
    report = folder.finish(cfg, FakeRclone(listing(hashes=False)), features={"Hashes": [], "Precision": 1})
    assert report["ok"]
    assert report["hash_kind"] is None
    assert (report["matched_by_hash"], report["matched_by_size"]) == (0, 3)


@pytest.mark.parametrize("precision, ok", [(1, False), (1_000_000_000, False), (None, True),
                                           (3_600_000_000_000, True)])
def test_modification_time_is_checked_where_destination_keeps_it(cfg, folder, precision, ok):
    report = folder.finish(cfg, FakeRclone(listing(mtime="2001-09-09T01:46:45Z")),
                           features={"Hashes": ["md5"], "Precision": precision})
    assert report["ok"] is ok


def test_mtime_within_a_second_is_fine(cfg, folder):
    report = folder.finish(cfg, FakeRclone(listing(mtime="2001-09-09T01:46:40.9Z")))
    assert report["ok"]


def test_extra_files_are_reported_but_do_not_fail(cfg, folder):
    entries = listing() + [{"Path": "unexpected.txt", "Size": 1, "ModTime": MTIME}]
    report = folder.finish(cfg, FakeRclone(entries))
    assert report["ok"]
    assert report["extra"] == ["unexpected.txt"]


def test_large_file_not_copied_yet_means_waiting(cfg, records):
    folder = Folder(records, larges=[("huge.bin", 10**9)])
    rclone = FakeRclone(listing())
    report = folder.finish(cfg, rclone)
    assert report == {"state": "waiting", "large_waiting": ["huge.bin"]}
    assert rclone.calls == []
    done = {large_file_id("huge.bin", 10**9, MTIME)}
    entries = listing() + [{"Path": "huge.bin", "Size": 10**9, "ModTime": MTIME}]
    assert folder.finish(cfg, FakeRclone(entries), larges_done=done)["ok"]


def test_folder_without_empty_directories_is_still_created(cfg, records):
    folder = Folder(records, dirs=())
    rclone = FakeRclone(listing())
    folder.finish(cfg, rclone)
    assert rclone.calls[0] == ["mkdir", "--", "dst:F"]


def test_folder_with_a_long_name_can_be_verified(cfg, records):
    # Its stem is 232 bytes: local files named after it once passed NAME_MAX (255).
    folder = Folder(records, name="長い名前" * 100)
    assert len(folder.stem) == 232
    assert folder.finish(cfg, FakeRclone(listing()))["ok"]


# Part records and the checks made before anything is downloaded

def test_part_record_and_entries_are_read_and_cross_checked(records):
    folder = Folder(records)
    record, entries = python_unzipper.read_part_record(records, folder.layout, folder.stem, "Full")
    assert record.key == folder.layout.part_object(folder.stem, "Full")
    assert [e["path"] for e in entries] == list(FILES)


def test_a_part_not_made_yet_says_run_the_zipper_not_malformed(records):
    folder = Folder(records)
    rkey = folder.layout.part_record(folder.stem, "Full")
    records.delete(rkey)
    with pytest.raises(python_unzipper.PartNotMade) as info:
        python_unzipper.read_part_record(records, folder.layout, folder.stem, "Full")
    assert rkey in str(info.value) and "run python_zipper.py" in str(info.value)
    assert "malformed" not in str(info.value)


@pytest.mark.parametrize("damage", ["record not an object", "record without key",
                                    "entries missing", "entries changed", "entry without offset"])
def test_unreadable_part_records_raise_naming_the_key(records, damage):
    folder = Folder(records)
    rkey = folder.layout.part_record(folder.stem, "Full")
    record = records.get_json(rkey)
    ekey = record["entries_key"]
    if damage == "record not an object":
        records.put_json(rkey, ["x"])
    elif damage == "record without key":
        records.put_json(rkey, {k: v for k, v in record.items() if k != "key"})
    elif damage == "entries missing":
        records.delete(ekey)
    elif damage == "entries changed":
        records.put_bytes(ekey, jsonl_gz_bytes([{"path": "other", "offset": 0, "size": 1, "md5": ""}]))
    elif damage == "entry without offset":
        body = jsonl_gz_bytes([{"path": "a.txt", "size": 5, "md5": ""}])
        records.put_bytes(ekey, body)
        records.put_json(rkey, {**record, "entries_sha256": hashlib.sha256(body).hexdigest()})
    with pytest.raises(RecordError) as info:
        python_unzipper.read_part_record(records, folder.layout, folder.stem, "Full")
    assert info.value.key in (rkey, ekey)
    assert info.value.key in str(info.value)


def restore(cfg, records, folder, entries_rows, *, size=1000):
    body = jsonl_gz_bytes(entries_rows)
    ekey = folder.layout.part_entries(folder.stem, "Full")
    records.put_bytes(ekey, body)
    records.put_json(folder.layout.part_record(folder.stem, "Full"), {
        "key": folder.layout.part_object(folder.stem, "Full"), "size": size, "sha256": "0" * 64,
        "entries_key": ekey, "entries_sha256": hashlib.sha256(body).hexdigest()})
    job = python_unzipper.RestoreJob(folder=folder.name, stem=folder.stem, part="Full", gen=1, keep={})
    rclone = FakeRclone([])
    with pytest.raises(python_unzipper.PartDamaged) as info:
        python_unzipper.restore_part(Run(cfg, records, folder.layout, rclone, Runtime()), job)
    assert rclone.calls == []
    assert folder.layout.part_object(folder.stem, "Full") in str(info.value)
    return info.value


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "a/../../b", "a\0b", ""])
def test_unsafe_entry_refuses_the_whole_part(cfg, records, path):
    folder = Folder(records)
    err = restore(cfg, records, folder, [{"path": "fine.txt", "offset": 0, "size": 1, "md5": ""},
                                         {"path": path, "offset": 100, "size": 1, "md5": ""}])
    assert repr(path) in str(err)
    assert records.get_json(folder.layout.restored_record(folder.stem, "Full")) is None


def test_zip_bomb_is_refused(cfg, records):
    folder = Folder(records)
    err = restore(cfg, records, folder, [{"path": "bomb", "offset": 0, "size": 100 * 1000 + 1, "md5": ""}])
    assert "MAX_ZIP_BOMB_RATIO" in str(err)


# A local DESTINATION: read back in place, no rclone

def write_local(root, files=FILES, mtime=MTIME):
    for path, data in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(data)
        ns = mtime_ns(mtime)
        os.utime(full, ns=(ns, ns))


@pytest.fixture
def local_cfg(make_cfg, tmp_path):
    cfg = make_cfg("unzipper", DESTINATION=str(tmp_path / "dest"))
    os.makedirs(cfg.tmp_dir)
    return cfg


def test_local_destination_is_read_back_and_checked_by_crc(local_cfg, folder, tmp_path):
    write_local(str(tmp_path / "dest" / "F"))
    rclone = FakeRclone([])
    report = folder.finish(local_cfg, rclone, features={})
    assert report["state"] == "verified", report
    assert report["hash_kind"] == "crc32" and report["matched_by_hash"] == 3
    assert rclone.calls == []  # directories made and files listed without rclone
    assert os.path.isdir(tmp_path / "dest" / "F" / "empty" / "dir")


def test_local_destination_with_same_size_other_bytes_fails_by_crc(local_cfg, folder, tmp_path):
    write_local(str(tmp_path / "dest" / "F"), {**FILES, "a.txt": b"HELLO"})
    report = folder.finish(local_cfg, FakeRclone([]), features={})
    assert report["state"] == "failed"
    assert [d["path"] for d in report["differing"]] == ["a.txt"]
    assert report["differing"][0]["why"].startswith("crc32 ")


def test_local_destination_mtime_is_checked(local_cfg, folder, tmp_path):
    write_local(str(tmp_path / "dest" / "F"), mtime="2001-09-09T01:46:50Z")
    report = folder.finish(local_cfg, FakeRclone([]), features={})
    assert report["state"] == "failed"
    assert all("modification time" in d["why"] for d in report["differing"])


def test_list_local_skips_symlinks_and_the_staging_folder_at_the_top(tmp_path):
    top = tmp_path / "dest"
    write_local(str(top), {"a": b"1", "sub/b": b"22", f"{python_unzipper.LOCAL_TMP}/x.part/c": b"3"})
    os.symlink(str(top / "a"), str(top / "link"))
    found = {e["Path"]: e for e in python_unzipper.list_local(str(top), recursive=True,
                                                             skip=(python_unzipper.LOCAL_TMP,))}
    assert sorted(found) == ["a", "sub/b"]
    assert found["sub/b"]["Size"] == 2 and found["sub/b"]["Hashes"]["crc32"] == f"{zlib.crc32(b'22'):08x}"
    flat = [e["Path"] for e in python_unzipper.list_local(str(top), recursive=False)]
    assert flat == ["a"]
    assert list(python_unzipper.list_local(str(tmp_path / "none"), recursive=True)) == []


def test_place_files_renames_into_place_and_copies_across_filesystems(tmp_path, monkeypatch):
    staging, target = tmp_path / "stage", tmp_path / "target"
    write_local(str(staging), {"a": b"1", "deep/er/b": b"22"})
    os.makedirs(target / "deep")
    (target / "a").write_bytes(b"old")
    real_replace = os.replace

    def cross_device(src, dst):
        if str(src).startswith(str(staging)) and str(dst).endswith("b"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)
    monkeypatch.setattr(python_unzipper.os, "replace", cross_device)
    python_unzipper.place_files(str(staging), str(target), ["a", "deep/er/b"])
    assert (target / "a").read_bytes() == b"1"
    assert (target / "deep" / "er" / "b").read_bytes() == b"22"
    assert os.stat(target / "deep" / "er" / "b").st_mtime_ns == mtime_ns(MTIME)
    assert sorted(os.listdir(target / "deep" / "er")) == ["b"]  # no .partial left


def test_local_destination_is_not_used_for_remotes_or_a_folder_named_like_the_staging(make_cfg, tmp_path):
    local = make_cfg("unzipper", DESTINATION=str(tmp_path / "d"))
    assert python_unzipper.local_destination(local) == str(tmp_path / "d")
    assert python_unzipper.local_destination(local, [FolderEntry(name=python_unzipper.LOCAL_TMP, stem="x")]) is None
    remote = make_cfg("unzipper", DESTINATION=":local:" + str(tmp_path / "d"))
    assert python_unzipper.local_destination(remote) is None


# Sums kept between a part's restore and its folder's verification

def test_sums_kept_from_the_restore_are_used_instead_of_s3(cfg, folder):
    python_unzipper.save_sums(cfg, folder.stem, "Full", [{"path": "a.txt", "md5": "m", "crc32": "c",
                                                          "mtime": MTIME}])
    assert list(python_unzipper.part_sums(cfg, folder.records, folder.layout, folder.stem, "Full")) == \
        [("a.txt", "m", "c", MTIME)]
    os.remove(python_unzipper.sums_path(cfg, folder.stem, "Full"))
    from_s3 = list(python_unzipper.part_sums(cfg, folder.records, folder.layout, folder.stem, "Full"))
    assert [p for p, _m, _c, _t in from_s3] == list(FILES)


# A folder is verified by the worker that restores its last part

def test_finisher_verifies_after_the_last_part_only_when_every_part_succeeded():
    seen = []
    finisher = python_unzipper.Finisher(lambda f: seen.append(f.stem) or {"state": "verified"})
    a, b = FolderEntry(name="A", stem="A"), FolderEntry(name="B", stem="B")
    finisher.expect("A", 2)
    finisher.expect("B", 2)
    assert finisher.part_done(a, True) is None
    assert finisher.part_done(a, True) == {"state": "verified"}
    assert finisher.part_done(b, False) is None
    assert finisher.part_done(b, True) is None  # a failed part: the folder is not verified now
    assert seen == ["A"]


def test_finisher_returns_a_verification_error_instead_of_raising():
    def broken(_folder):
        raise RecordError("k", "broken")
    finisher = python_unzipper.Finisher(broken)
    finisher.expect("A", 1)
    assert isinstance(finisher.part_done(FolderEntry(name="A", stem="A"), True), RecordError)


def test_a_worker_removes_only_its_own_staging_beside_a_shared_destination(tmp_path):
    """Workers on one machine may share a local DESTINATION: until every folder of the map is
    verified, one worker's end must not remove another's staging folders."""
    tmp = tmp_path / python_unzipper.LOCAL_TMP
    for name in ("Photos-abc.Part1.w1", "Photos-abc.Part2.w2", "Docs-def.Full"):
        (tmp / name).mkdir(parents=True)
        (tmp / name / "f").write_bytes(b"x")
    python_unzipper.remove_local_tmp(str(tmp_path), everything=False, worker_id="w1")
    assert sorted(os.listdir(tmp)) == ["Docs-def.Full", "Photos-abc.Part2.w2"]
    python_unzipper.remove_local_tmp(str(tmp_path), everything=True, worker_id="w1")
    assert not tmp.exists()
