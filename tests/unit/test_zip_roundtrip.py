"""A part's whole life without rclone: files in a staging folder -> write_zip through S3Sink
into moto (single PUT and multipart) -> extract_part back into files, and every kind of
damage to the object on S3 is caught."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import shutil
import threading
import time
import unicodedata
import zipfile
import zlib

import pytest
from botocore.stub import Stubber

import python_unzipper
import python_zipper
from common_s3 import (MIB, DiskGate, Layout, MigrationError, Records, Runtime, S3AuthError, StopRequested,
                       jsonl_gz_bytes, mtime_ns, parse_mtime, read_jsonl_gz)

BUCKET = "unit-bucket"
CHUNK = 5 * MIB  # the smallest part S3 (and moto) accepts, except the last one


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


SMALL_FILES = [
    ("a.txt", b"hello", "2001-09-09T01:46:40.25Z"),
    ("dir/sub/b c.txt", b"spaces in the path\n" * 10, "2020-02-29T12:00:00.123456789+02:00"),
    ("#hash;semi 'q'.txt", b"awkward name", "1999-12-31T23:59:59Z"),
    ("日本/語.txt", "unicode name".encode(), "2010-01-01T00:00:00.5Z"),
    (unicodedata.normalize("NFD", "café.txt"), b"decomposed", "2015-05-05T05:05:05Z"),
    ("zero", b"", "1975-06-01T00:00:00Z"),
    ("moon", b"pre-1970", "1969-07-20T20:17:40Z"),
]
BIG_FILES = [
    ("big/one.bin", rand_bytes(7 * MIB + 123, 1), "2022-01-01T00:00:00.000000001Z"),
    ("big/two.bin", rand_bytes(5 * MIB - 7, 2), "2023-03-03T03:03:03Z"),
]


def stage(root: str, files) -> list[dict]:
    rows = []
    for path, data, mtime in files:
        target = os.path.join(root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(data)
        rows.append({"path": path, "size": len(data), "mtime": mtime})
    return rows


class Part:
    """One part zipped into moto, with everything a test wants to look at."""

    def __init__(self, records, tmp_path, files, *, key="work_files_zips/F_Full.zip", chunk=CHUNK):
        self.records = records
        self.s3 = records.s3
        self.files = files
        self.key = key
        staging = str(tmp_path / "staging")
        rows = stage(staging, files)
        self.job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows,
                                         bytes=sum(r["size"] for r in rows))
        self.runtime = Runtime()
        self.sink = python_zipper.S3Sink(records, key, chunk, self.runtime)
        self.entries = python_zipper.write_zip(self.sink, self.job, staging, set(), self.runtime)
        self.sink.finish()
        self.head = self.s3.head_object(Bucket=BUCKET, Key=key)
        self.etag = self.head["ETag"].strip('"')
        # The part record as zip_part writes it; entries go through their gzip form.
        self.entries = list(read_jsonl_gz(jsonl_gz_bytes(self.entries), "entries"))
        self.record = {"key": key, "size": self.sink.total, "etag": self.etag,
                       "sha256": self.sink.sha256.hexdigest()}
        self.keep = {r["path"]: r for r in rows}
        self.out = str(tmp_path / "out")
        os.makedirs(self.out)

    def data(self) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=self.key)["Body"].read()

    def replace(self, data: bytes) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=self.key, Body=data)

    def extract(self, record=None, keep=None) -> int:
        return python_unzipper.extract_part(self.records, record or self.record, self.entries,
                                            self.keep if keep is None else keep, self.out, Runtime())


@pytest.fixture
def small(records, tmp_path):
    return Part(records, tmp_path, SMALL_FILES)


@pytest.fixture
def multipart(records, tmp_path):
    return Part(records, tmp_path, SMALL_FILES + BIG_FILES)


# Writing

@pytest.mark.parametrize("which", ["small", "multipart"])
def test_zip_is_readable_and_every_entry_matches(request, which):
    part = request.getfixturevalue(which)
    data = part.data()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert [i.filename for i in infos] == [p for p, _, _ in part.files]
        for info, (path, content, mtime), entry in zip(infos, part.files, part.entries):
            assert zf.read(info) == content
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.CRC == zlib.crc32(content)
            assert entry == {"path": path, "offset": info.header_offset, "size": len(content),
                             "crc32": f"{zlib.crc32(content):08x}",
                             "md5": hashlib.md5(content).hexdigest(), "mtime": mtime}
            dos = python_zipper.dos_time(parse_mtime(mtime))
            assert info.date_time == dos[:5] + (dos[5] // 2 * 2,)  # DOS keeps even seconds
            assert python_zipper.ut_extra(parse_mtime(mtime)) in info.extra


def test_small_part_is_one_put(small):
    assert len(small.sink.chunk_md5s) == 1
    assert small.sink.upload_id is None
    assert small.head["ContentLength"] == small.sink.total == len(small.data())
    assert small.etag == python_zipper.expected_etag(small.sink.chunk_md5s) == hashlib.md5(small.data()).hexdigest()
    assert small.etag == small.sink.etag
    assert small.record["sha256"] == hashlib.sha256(small.data()).hexdigest()


def test_large_part_is_a_multipart_upload(multipart):
    total = multipart.sink.total
    assert total > 2 * CHUNK
    assert len(multipart.sink.chunk_md5s) == -(-total // CHUNK) == 3
    assert multipart.head["ContentLength"] == total == len(multipart.data())
    assert multipart.etag == python_zipper.expected_etag(multipart.sink.chunk_md5s)
    assert multipart.etag.endswith("-3")
    assert multipart.etag == multipart.sink.etag
    assert multipart.record["sha256"] == hashlib.sha256(multipart.data()).hexdigest()
    assert multipart.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_sink_is_not_seekable(records):
    sink = python_zipper.S3Sink(records, "k", CHUNK, Runtime())
    assert sink.seekable() is False
    with pytest.raises(OSError):
        sink.seek(0)
    sink.write(b"abc")
    assert sink.tell() == 3


def test_sink_without_md5_still_checks_the_etag(records):
    sink = python_zipper.S3Sink(records, "nomd5", CHUNK, Runtime(), send_md5=False)
    data = rand_bytes(CHUNK + 10, 3)
    sink.write(data)
    sink.finish()
    head = records.s3.head_object(Bucket=BUCKET, Key="nomd5")
    assert head["ETag"].strip('"') == python_zipper.expected_etag(sink.chunk_md5s, multipart=sink.multipart)


def test_object_of_exactly_one_chunk_has_the_expected_etag(records):
    sink = python_zipper.S3Sink(records, "exact", CHUNK, Runtime())
    sink.write(rand_bytes(CHUNK, 4))
    sink.finish()
    head = records.s3.head_object(Bucket=BUCKET, Key="exact")
    assert head["ContentLength"] == CHUNK
    assert head["ETag"].strip('"') == python_zipper.expected_etag(sink.chunk_md5s, multipart=sink.multipart)


@pytest.mark.parametrize("size", [2 * CHUNK, CHUNK + 1, CHUNK - 1])
def test_etag_check_at_chunk_boundaries(records, size):
    sink = python_zipper.S3Sink(records, "edge", CHUNK, Runtime())
    data = rand_bytes(size, size)
    for start in range(0, size, 999_999):  # writes that do not line up with chunks
        sink.write(data[start:start + 999_999])
    sink.finish()
    head = records.s3.head_object(Bucket=BUCKET, Key="edge")
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"') == python_zipper.expected_etag(sink.chunk_md5s, multipart=sink.multipart)
    assert records.s3.get_object(Bucket=BUCKET, Key="edge")["Body"].read() == data


def test_abort_removes_the_unfinished_upload(records):
    sink = python_zipper.S3Sink(records, "aborted", CHUNK, Runtime())
    sink.write(rand_bytes(CHUNK + 1, 5))
    assert sink.upload_id is not None
    sink.abort()
    assert sink.upload_id is None
    assert records.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert records.head("aborted") is None


def test_stop_request_interrupts_the_stream(records):
    runtime = Runtime()
    sink = python_zipper.S3Sink(records, "stopped", CHUNK, runtime)
    sink.write(b"x")
    runtime.request_stop(15)
    with pytest.raises(StopRequested):
        sink.write(b"y")


def test_file_that_changed_size_while_zipped_is_refused(records, tmp_path):
    staging = str(tmp_path / "staging")
    rows = stage(staging, [("a", b"12345", "2001-09-09T01:46:40Z")])
    rows[0]["size"] = 4  # the map says 4 bytes, the staged file has 5
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    sink = python_zipper.S3Sink(records, "changed", CHUNK, Runtime())
    with pytest.raises(MigrationError) as info:
        python_zipper.write_zip(sink, job, staging, set(), Runtime())
    assert "'a'" in str(info.value)


def test_file_read_in_place_that_changed_while_zipped_is_refused(records, tmp_path):
    """A local SOURCE is read in place; a file written during the read (same size, new mtime)
    fails the part instead of giving it bytes that are half old, half new."""
    staging = str(tmp_path / "staging")
    rows = stage(staging, [("a", b"12345", "2001-09-09T01:46:40Z"), ("b", b"678", "2001-09-09T01:46:40Z")])
    os.utime(os.path.join(staging, "a"), (1_000_000_000, 1_000_000_000))  # as mapped
    os.utime(os.path.join(staging, "b"), (1_000_000_100, 1_000_000_100))  # written after it was mapped
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    in_place = {r["path"]: os.path.join(staging, r["path"]) for r in rows}
    sink = python_zipper.S3Sink(records, "changed-in-place", CHUNK, Runtime())
    with pytest.raises(MigrationError) as info:
        python_zipper.write_zip(sink, job, in_place, set(), Runtime())
    assert "'b'" in str(info.value) and "changed at SOURCE" in str(info.value)


def test_skipped_files_are_left_out(records, tmp_path):
    staging = str(tmp_path / "staging")
    rows = stage(staging, SMALL_FILES[:3])
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    sink = python_zipper.S3Sink(records, "skip", CHUNK, Runtime())
    entries = python_zipper.write_zip(sink, job, staging, {SMALL_FILES[1][0]}, Runtime())
    sink.finish()
    assert [e["path"] for e in entries] == [SMALL_FILES[0][0], SMALL_FILES[2][0]]


# Reading back

@pytest.mark.parametrize("which", ["small", "multipart"])
def test_extract_restores_bytes_and_mtimes(request, which):
    part = request.getfixturevalue(which)
    assert part.extract() == len(part.files)
    for path, content, mtime in part.files:
        target = os.path.join(part.out, path)
        with open(target, "rb") as fh:
            assert fh.read() == content
        assert os.stat(target).st_mtime_ns == mtime_ns(mtime)


def test_extract_writes_only_the_kept_entries(small):
    keep = {p: r for p, r in small.keep.items() if p in ("a.txt", "日本/語.txt")}
    assert small.extract(keep=keep) == 2
    written = sorted(os.path.relpath(os.path.join(d, f), small.out)
                     for d, _, fs in os.walk(small.out) for f in fs)
    assert written == sorted(keep)


def test_extract_nothing_still_reads_and_checks_the_whole_object(small):
    assert small.extract(keep={}) == 0
    assert os.listdir(small.out) == []
    small.replace(flip(small.data(), len(small.data()) - 1))
    with pytest.raises(python_unzipper.PartDamaged):
        small.extract(record={**small.record, "etag": None}, keep={})


def test_map_size_differing_from_the_entry_is_refused(small):
    keep = dict(small.keep)
    keep["a.txt"] = {**keep["a.txt"], "size": 6}
    with pytest.raises(python_unzipper.PartDamaged) as info:
        small.extract(keep=keep)
    assert "a.txt" in str(info.value)


# Damage on S3

def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def where(part: Part, spot: str) -> int:
    data = part.data()
    if spot == "file data":
        return data.index(b"hello") + 1
    if spot == "entry name":
        return part.entries[0]["offset"] + 30
    if spot == "local header signature":
        return part.entries[1]["offset"]
    if spot == "central directory":
        return data.index(b"PK\x01\x02") + 12  # the first entry's DOS time
    if spot == "last byte":
        return len(data) - 1
    raise AssertionError(spot)


SPOTS = ["file data", "entry name", "local header signature", "central directory", "last byte"]


@pytest.mark.parametrize("spot", SPOTS)
def test_flipped_byte_is_caught_by_the_etag(small, spot):
    small.replace(flip(small.data(), where(small, spot)))
    with pytest.raises(python_unzipper.PartDamaged) as info:
        small.extract()
    assert small.key in str(info.value)
    assert info.value.key == small.key
    assert "ETag" in str(info.value)
    assert info.value.exit_code == 3


@pytest.mark.parametrize("spot, found_by", [
    ("file data", "CRC-32"),
    ("entry name", "recorded"),
    ("local header signature", "no local header"),
    ("central directory", "SHA-256"),
    ("last byte", "SHA-256"),
])
def test_flipped_byte_is_caught_without_the_etag(small, spot, found_by):
    small.replace(flip(small.data(), where(small, spot)))
    record = {k: v for k, v in small.record.items() if k != "etag"}
    with pytest.raises(python_unzipper.PartDamaged) as info:
        small.extract(record=record)
    assert small.key in str(info.value)
    assert found_by in str(info.value)


def test_flipped_byte_in_a_multipart_object(multipart):
    data = multipart.data()
    multipart.replace(flip(data, len(data) // 2))
    with pytest.raises(python_unzipper.PartDamaged):
        multipart.extract()
    record = {k: v for k, v in multipart.record.items() if k != "etag"}
    with pytest.raises(python_unzipper.PartDamaged) as info:
        multipart.extract(record=record)
    assert "CRC-32" in str(info.value)  # the middle of the object is inside big/one.bin


def test_longer_object_is_caught(small):
    small.replace(small.data() + b"extra")
    record = {k: v for k, v in small.record.items() if k != "etag"}
    with pytest.raises(python_unzipper.PartDamaged) as info:
        small.extract(record=record)
    assert "bytes read" in str(info.value)


def test_object_cut_after_the_last_entry_is_caught(small):
    data = small.data()
    small.replace(data[:data.index(b"PK\x01\x02") + 4])
    record = {k: v for k, v in small.record.items() if k != "etag"}
    with pytest.raises(python_unzipper.PartDamaged):
        small.extract(record=record)


def test_object_cut_inside_an_entry_is_part_damaged(small):
    data = small.data()
    small.replace(data[:small.entries[2]["offset"] + 10])
    record = {k: v for k, v in small.record.items() if k != "etag"}
    with pytest.raises(python_unzipper.PartDamaged) as info:
        small.extract(record=record)
    assert small.key in str(info.value)


def test_entries_out_of_order_or_overlapping_are_refused(small):
    entries = [dict(e) for e in small.entries]
    entries[1]["offset"] = entries[0]["offset"] + 1
    with pytest.raises(python_unzipper.PartDamaged) as info:
        python_unzipper.extract_part(small.records, small.record, entries, small.keep, small.out, Runtime())
    assert "overlaps" in str(info.value) or "no local header" in str(info.value)


def test_recorded_crc_mismatch_is_refused(small):
    entries = [dict(e) for e in small.entries]
    entries[0]["crc32"] = "0" * 8
    with pytest.raises(python_unzipper.PartDamaged) as info:
        python_unzipper.extract_part(small.records, small.record, entries, small.keep, small.out, Runtime())
    assert "CRC-32" in str(info.value)


def test_recorded_md5_mismatch_is_refused_when_no_crc_was_recorded(small):
    entries = [{k: v for k, v in e.items() if k != "crc32"} for e in small.entries]
    entries[0]["md5"] = "0" * 32
    with pytest.raises(python_unzipper.PartDamaged) as info:
        python_unzipper.extract_part(small.records, small.record, entries, small.keep, small.out, Runtime())
    assert "MD5" in str(info.value)


# Failures while streaming (Stubber: no minimum part size, exact call order; a gate holds the
# uploader thread inside a chunk upload so the interleaving is always the same)

@pytest.fixture
def gated(stub_client, make_cfg, instant_stop):
    """(sink with 4-byte chunks, stubber, gate) on a stubbed client; UploadPart waits for the gate."""
    records = Records(stub_client, make_cfg(), stop=instant_stop)
    gate = threading.Event()
    stub_client.meta.events.register("before-parameter-build.s3.UploadPart", lambda **kw: gate.wait(10))
    sink = python_zipper.S3Sink(records, "k.zip", 4, Runtime(), uploaders=1)
    with Stubber(stub_client) as stubber:
        stubber.add_response("create_multipart_upload", {"UploadId": "u1"},
                             {"Bucket": BUCKET, "Key": "k.zip", "ContentType": "application/zip"})
        yield sink, stubber, gate
    gate.set()


def wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert predicate()


def test_failed_chunk_upload_surfaces_in_the_writer_and_is_aborted(gated):
    sink, stubber, gate = gated
    stubber.add_client_error("upload_part", service_error_code="AccessDenied", http_status_code=403)
    stubber.add_response("abort_multipart_upload", {}, {"Bucket": BUCKET, "Key": "k.zip", "UploadId": "u1"})
    sink.write(b"01234")  # chunk 1 goes to the uploader, which waits at the gate
    gate.set()
    wait_until(lambda: sink._error is not None)  # the upload failed in the uploader thread
    with pytest.raises(S3AuthError):
        sink.write(b"5")
    with pytest.raises(S3AuthError):
        sink.finish()
    sink.abort()
    assert sink.upload_id is None
    stubber.assert_no_pending_responses()


def test_a_full_chunk_waits_for_a_free_upload_slot_and_hears_of_a_failure(gated):
    """With one upload slot, the next full chunk waits (memory stays bounded); when the upload
    in flight fails, the waiting writer raises instead of hanging."""
    sink, stubber, gate = gated
    stubber.add_client_error("upload_part", service_error_code="AccessDenied", http_status_code=403)
    outcome = {}

    def write():
        try:
            sink.write(b"012345678")  # chunk 1 is held at the gate, chunk 2 waits for its slot
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc
    helper = threading.Thread(target=write, daemon=True)
    helper.start()
    helper.join(0.5)
    assert helper.is_alive(), "the second chunk did not wait for the slot"
    assert sink.chunks == 2 and sink._queue.qsize() == 0
    gate.set()  # chunk 1 fails
    helper.join(10)
    assert not helper.is_alive(), "the writer blocked forever after a failed upload"
    assert isinstance(outcome.get("error"), S3AuthError)


def test_finish_reports_a_failed_chunk_upload_instead_of_hanging(gated):
    sink, stubber, gate = gated
    stubber.add_client_error("upload_part", service_error_code="AccessDenied", http_status_code=403)
    sink.write(b"01234")  # chunk 1 is held at the gate; "4" waits for finish()
    outcome = {}

    def finish():
        try:
            sink.finish()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc
    helper = threading.Thread(target=finish, daemon=True)
    helper.start()
    gate.set()  # chunk 1 fails while finish() waits to send the last chunk
    helper.join(10)
    assert not helper.is_alive(), "S3Sink.finish() blocked forever on a failed upload"
    assert isinstance(outcome.get("error"), S3AuthError)


def test_stale_uploads_are_listed_and_aborted(records):
    s3 = records.s3
    ids = [s3.create_multipart_upload(Bucket=BUCKET, Key="work_files_zips/F_Full.zip")["UploadId"]
           for _ in range(2)]
    other = s3.create_multipart_upload(Bucket=BUCKET, Key="elsewhere/x.zip")["UploadId"]
    found = python_zipper.list_stale_uploads(records, "work_files_zips/")
    assert list(found) == ["work_files_zips/F_Full.zip"]
    assert sorted(found["work_files_zips/F_Full.zip"]) == sorted(ids)
    python_zipper.abort_uploads(records, "work_files_zips/F_Full.zip", ids)
    left = [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]
    assert left == [other]


def test_servers_without_upload_listing_have_no_stale_uploads(stub_client, make_cfg, instant_stop):
    records = Records(stub_client, make_cfg(), stop=instant_stop)
    with Stubber(stub_client) as stubber:
        stubber.add_client_error("list_multipart_uploads", service_error_code="NotImplemented",
                                 http_status_code=501)
        assert python_zipper.list_stale_uploads(records, "p/") == {}


# Checking the staged files against the map

def test_check_staged(tmp_path):
    staging = str(tmp_path)
    rows = stage(staging, [("ok.txt", b"12345", "2001-09-09T01:46:40Z"),
                           ("size.txt", b"123", "2001-09-09T01:46:40Z"),
                           ("time.txt", b"1", "2001-09-09T01:46:40Z"),
                           ("close.txt", b"1", "2001-09-09T01:46:40Z")])
    rows.append({"path": "missing.txt", "size": 1, "mtime": "2001-09-09T01:46:40Z"})
    ok_ns = mtime_ns("2001-09-09T01:46:40Z")
    for name, ns in (("ok.txt", ok_ns), ("size.txt", ok_ns), ("time.txt", ok_ns + 5 * 10**9),
                     ("close.txt", ok_ns + 9 * 10**8)):
        os.utime(os.path.join(staging, name), ns=(ns, ns))
    rows[1]["size"] = 4
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    bad = python_zipper.check_staged(job.files, staging)
    assert [b["path"] for b in bad] == ["size.txt", "time.txt", "missing.txt"]
    assert bad[2]["reason"] == "missing"
    assert "size" in bad[0]["reason"]


def test_existing_records_are_grouped_by_exact_stem(records):
    for key in ("work_files_zips/_parts/Photos/Full.json",
                "work_files_zips/_parts/Photos/Full.entries.jsonl.gz",
                "work_files_zips/_parts/Photos_2020/Part1.json",
                "work_files_zips/_parts/Photos_2020/Part2.json",
                "work_files_zips/_parts/Photos_2020/sub/Part3.json"):
        records.put_bytes(key, b"{}")
    found = records.record_names("work_files_zips/_parts/")
    assert found == {"Photos": {"Full"}, "Photos_2020": {"Part1", "Part2"}}


# zip_part -> read_part_record -> extract_part, with a fake rclone that copies local files

class CopyingRclone:
    """Stands in for ``rclone copy --files-from0 LIST -- SOURCE STAGING``: copies with mtimes."""

    def __init__(self):
        self.calls = []

    def run_retried(self, args, *, what, **_kw):
        self.calls.append(list(args))
        assert args[0] == "copy" and args[1] == "--files-from0"
        with open(args[2], "rb") as fh:
            names = [n.decode() for n in fh.read().split(b"\0") if n]
        source, staging = args[-2].removeprefix(":local:"), args[-1]
        for name in names:
            os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
            shutil.copy2(os.path.join(source, name), os.path.join(staging, name))


@pytest.fixture
def zipper_env(records, make_cfg, tmp_path):
    source = tmp_path / "source"
    usage = tmp_path / "disk-used-percent"
    usage.write_text("10")  # a fixed disk reading: the test must not depend on the real disk
    cfg = make_cfg("zipper", SOURCE=str(source), MIGRATION_TEST_DISK_USAGE_FILE=str(usage))
    os.makedirs(cfg.tmp_dir)
    records.cfg = cfg
    runtime = Runtime()
    return cfg, records, Layout(cfg.prefix), runtime, DiskGate(cfg, runtime), str(source)


def make_job(source: str, files, folder="F") -> python_zipper.PartJob:
    rows = stage(os.path.join(source, folder), files)
    for row in rows:
        ns = mtime_ns(row["mtime"])
        os.utime(os.path.join(source, folder, row["path"]), ns=(ns, ns))
    return python_zipper.PartJob(folder=folder, stem=folder, part="Full", gen=1, files=rows,
                                 bytes=sum(r["size"] for r in rows))


@pytest.mark.parametrize("form", ["local path", "rclone remote"])
def test_zip_part_records_a_part_the_unzipper_can_restore(zipper_env, tmp_path, form):
    cfg, records, layout, runtime, gate, source = zipper_env
    if form == "rclone remote":  # the same folder, named so that only rclone reads it
        cfg = dataclasses.replace(cfg, source=":local:" + source)
    job = make_job(source, SMALL_FILES)
    rclone = CopyingRclone()
    record = python_zipper.zip_part(cfg, records, layout, rclone, runtime, gate, job)
    assert record["key"] == layout.part_object("F", "Full")
    assert record["files"] == len(SMALL_FILES)
    if form == "local path":  # read in place: no rclone process, no staging copy
        assert rclone.calls == []
    else:
        assert rclone.calls[0][-2] == ":local:" + os.path.join(source, "F")
        assert os.path.dirname(rclone.calls[0][-1]) == cfg.tmp_dir  # staging under the script's tmp
    assert os.listdir(cfg.tmp_dir) == []  # staging and file list removed
    stored, entries = python_unzipper.read_part_record(records, layout, "F", "Full")
    assert stored == record
    out = str(tmp_path / "restored")
    os.makedirs(out)
    keep = {r["path"]: r for r in job.files}
    assert python_unzipper.extract_part(records, stored, entries, keep, out, Runtime()) == len(SMALL_FILES)
    for path, content, mtime in SMALL_FILES:
        with open(os.path.join(out, path), "rb") as fh:
            assert fh.read() == content
        assert os.stat(os.path.join(out, path)).st_mtime_ns == mtime_ns(mtime)


def test_zip_part_at_a_local_source_fetches_only_what_is_not_plain_as_mapped(zipper_env, tmp_path):
    """A symlink, or a file whose time differs from the map, is not read in place: rclone
    fetches it with its own rules, and it is checked and classified like any download."""
    cfg, records, layout, runtime, gate, source = zipper_env
    job = make_job(source, SMALL_FILES)
    folder = os.path.join(source, "F")
    first, second = job.files[0]["path"], job.files[1]["path"]
    os.rename(os.path.join(folder, first), str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), os.path.join(folder, first))
    ns = mtime_ns(job.files[1]["mtime"]) + 5 * 10**9
    os.utime(os.path.join(folder, second), ns=(ns, ns))
    where, fetch = python_zipper.split_local(job.files, folder)
    assert [f["path"] for f in fetch] == [first, second]
    assert set(where) == {f["path"] for f in job.files[2:]}

    class FollowingRclone(CopyingRclone):  # as with --copy-links; the changed time stays changed
        def run_retried(self, args, **kw):
            super().run_retried(args, **kw)
            os.utime(os.path.join(args[-1], second), ns=(ns, ns))

    class Relisting:  # rclone lsjson after the download: the file is at SOURCE, changed
        def lsjson(self, *_a, **_kw):
            return [{"Path": second, "Size": job.files[1]["size"], "ModTime": "2030-01-01T00:00:00Z"}]

    rclone = FollowingRclone()
    rclone.lsjson = Relisting().lsjson
    record = python_zipper.zip_part(cfg, records, layout, rclone, runtime, gate, job)
    assert len(rclone.calls) == 1
    assert record["files"] == len(SMALL_FILES) - 1
    assert [s["path"] for s in record["skipped"]] == [second]
    assert "changed" in record["skipped"][0]["reason"]
    _stored, entries = python_unzipper.read_part_record(records, layout, "F", "Full")
    assert first in {e["path"] for e in entries}


def zip_size_for(records, files) -> int:
    staging = records.cfg.tmp_dir + "-probe"
    rows = stage(staging, files)
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    sink = python_zipper.S3Sink(records, "probe.zip", 64 * MIB, Runtime())
    python_zipper.write_zip(sink, job, staging, set(), Runtime())
    return sink.total


def test_zip_part_of_exactly_one_chunk(zipper_env):
    cfg, records, layout, runtime, gate, source = zipper_env
    overhead = zip_size_for(records, [("f.bin", b"x" * 1000, "2001-09-09T01:46:40Z")]) - 1000
    size = python_zipper.MIN_CHUNK - overhead
    job = make_job(source, [("f.bin", rand_bytes(size, 9), "2001-09-09T01:46:40Z")])
    assert python_zipper.chunk_size_for(size + python_zipper.zip_overhead(["f.bin"])) == python_zipper.MIN_CHUNK
    record = python_zipper.zip_part(cfg, records, layout, CopyingRclone(), runtime, gate, job)
    assert record["size"] == python_zipper.MIN_CHUNK
