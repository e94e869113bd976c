"""A part's whole life without rclone: files in a staging folder -> write_zip through S3Sink
into moto (single PUT and multipart) -> extract_part back into files, and every kind of
damage to the object on S3 is caught."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import zipfile
import zlib

import pytest
from botocore.stub import Stubber

import python_unzipper
import python_zipper
from common_s3 import (MIB, DiskGate, Layout, MigrationError, PartRecord, Records, Run, Runtime, S3AuthError, StopRequested,
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

    def __init__(self, records, tmp_path, files, *, key="work_files_zips/F_Full.zip", chunk=CHUNK, writer=None):
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
        self.entries = (writer or python_zipper.write_zip)(self.sink, self.job, staging, set(), self.runtime)
        self.sink.finish()
        self.head = self.s3.head_object(Bucket=BUCKET, Key=key)
        self.etag = self.head["ETag"].strip('"')
        # The part record as zip_part writes it; entries go through their gzip form.
        self.entries = list(read_jsonl_gz(jsonl_gz_bytes(self.entries), "entries"))
        self.record = PartRecord(key=key, size=self.sink.total, etag=self.etag,
                                 sha256=self.sink.sha256.hexdigest(), entries_key="")
        self.keep = {r["path"]: r for r in rows}
        self.out = str(tmp_path / "out")
        os.makedirs(self.out)

    def data(self) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=self.key)["Body"].read()

    def replace(self, data: bytes) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=self.key, Body=data)

    def to_file(self, tmp_path) -> str:
        """The part as a local file, for readers other than ours."""
        path = str(tmp_path / os.path.basename(self.key))
        with open(path, "wb") as fh:
            fh.write(self.data())
        return path

    def extract(self, record=None, keep=None) -> int:
        return python_unzipper.extract_part(self.records, record or self.record, self.entries,
                                            self.keep if keep is None else keep, self.out, Runtime())


@pytest.fixture
def small(records, tmp_path):
    return Part(records, tmp_path, SMALL_FILES)


@pytest.fixture
def multipart(records, tmp_path):
    return Part(records, tmp_path, SMALL_FILES + BIG_FILES)


BOUND = 64 * 1024  # IN_MEMORY_MAX in the tests of files read twice (CRC-32 first)
MIXED_FILES = SMALL_FILES + [
    ("bound/at.bin", rand_bytes(BOUND, 11), "2021-04-01T10:00:00Z"),  # read once, into memory
    ("bound/over.bin", rand_bytes(BOUND + 1, 12), "2021-04-01T10:00:01Z"),  # read twice
    ("bound/several blocks.bin", rand_bytes(2 * MIB + MIB // 2 + 7, 13), "2021-07-01T22:30:00Z"),
]


@pytest.fixture
def mixed(records, tmp_path, monkeypatch):
    """A part of zero-byte, small and over-the-bound files (IN_MEMORY_MAX = 64 KiB); ``read_twice``
    lists the files that took the two-pass way."""
    monkeypatch.setattr(python_zipper, "IN_MEMORY_MAX", BOUND)
    read_twice = []
    write_file = python_zipper.write_file

    def spy(zf, info, src, f, **kw):
        if kw["buffers"].whole is None:
            read_twice.append(f["path"])
        return write_file(zf, info, src, f, **kw)
    monkeypatch.setattr(python_zipper, "write_file", spy)
    part = Part(records, tmp_path, MIXED_FILES)
    part.read_twice = read_twice
    return part


# Writing

@pytest.mark.parametrize("which", ["small", "multipart", "mixed"])
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
    assert small.record.sha256 == hashlib.sha256(small.data()).hexdigest()


def test_large_part_is_a_multipart_upload(multipart):
    total = multipart.sink.total
    assert total > 2 * CHUNK
    assert len(multipart.sink.chunk_md5s) == -(-total // CHUNK) == 3
    assert multipart.head["ContentLength"] == total == len(multipart.data())
    assert multipart.etag == python_zipper.expected_etag(multipart.sink.chunk_md5s)
    assert multipart.etag.endswith("-3")
    assert multipart.etag == multipart.sink.etag
    assert multipart.record.sha256 == hashlib.sha256(multipart.data()).hexdigest()
    assert multipart.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_sink_is_not_seekable(records):
    sink = python_zipper.S3Sink(records, "k", CHUNK, Runtime())
    assert sink.seekable() is False
    with pytest.raises(OSError):
        sink.seek(0)
    sink.write(b"abc")
    assert sink.tell() == 3


def test_sink_without_md5_still_checks_the_etag(records):
    sink = python_zipper.S3Sink(records, "nomd5", CHUNK, Runtime(), python_zipper.SinkOptions(send_md5=False))
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

@pytest.mark.parametrize("which", ["small", "multipart", "mixed"])
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
        small.extract(record=dataclasses.replace(small.record, etag=""), keep={})


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
    record = dataclasses.replace(small.record, etag="")
    with pytest.raises(python_unzipper.PartDamaged) as info:
        small.extract(record=record)
    assert small.key in str(info.value)
    assert found_by in str(info.value)


def test_flipped_byte_in_a_multipart_object(multipart):
    data = multipart.data()
    multipart.replace(flip(data, len(data) // 2))
    with pytest.raises(python_unzipper.PartDamaged):
        multipart.extract()
    record = dataclasses.replace(multipart.record, etag="")
    with pytest.raises(python_unzipper.PartDamaged) as info:
        multipart.extract(record=record)
    assert "CRC-32" in str(info.value)  # the middle of the object is inside big/one.bin


def test_longer_object_is_caught(small):
    small.replace(small.data() + b"extra")
    record = dataclasses.replace(small.record, etag="")
    with pytest.raises(python_unzipper.PartDamaged) as info:
        small.extract(record=record)
    assert "bytes read" in str(info.value)


def test_object_cut_after_the_last_entry_is_caught(small):
    data = small.data()
    small.replace(data[:data.index(b"PK\x01\x02") + 4])
    record = dataclasses.replace(small.record, etag="")
    with pytest.raises(python_unzipper.PartDamaged):
        small.extract(record=record)


def test_object_cut_inside_an_entry_is_part_damaged(small):
    data = small.data()
    small.replace(data[:small.entries[2]["offset"] + 10])
    record = dataclasses.replace(small.record, etag="")
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
    sink = python_zipper.S3Sink(records, "k.zip", 4, Runtime(), python_zipper.SinkOptions(uploaders=1))
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


def test_check_staged_with_s3_lastmodified_compares_the_listed_md5_instead_of_the_mtime(tmp_path):
    staging = str(tmp_path)
    # The map's times are LastModified (an upload time), never the staged copy's own mtime.
    rows = stage(staging, [("same.txt", b"12345", "2026-01-01T00:00:00.123Z"),
                           ("changed.txt", b"abcde", "2026-01-01T00:00:00.123Z"),
                           ("unhashed.txt", b"xy", "2026-01-01T00:00:00.123Z")])
    rows[0]["hashes"] = {"md5": hashlib.md5(b"12345").hexdigest()}
    rows[1]["hashes"] = {"md5": hashlib.md5(b"abcdX").hexdigest()}  # same size, other bytes since mapping
    for name in ("same.txt", "changed.txt", "unhashed.txt"):
        os.utime(os.path.join(staging, name), (1_000_000_000, 1_000_000_000))
    assert [b["path"] for b in python_zipper.check_staged(rows, staging)] == ["same.txt", "changed.txt",
                                                                             "unhashed.txt"]
    bad = python_zipper.check_staged(rows, staging, server_mtime=True)
    assert [(b["path"], b["reason"]) for b in bad] == [("changed.txt", "MD5 differs from the map")]


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
    record = python_zipper.zip_part(Run(cfg, records, layout, rclone, runtime, gate), job)
    assert record.key == layout.part_object("F", "Full")
    assert record.files == len(SMALL_FILES)
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
    record = python_zipper.zip_part(Run(cfg, records, layout, rclone, runtime, gate), job)
    assert len(rclone.calls) == 1
    assert record.files == len(SMALL_FILES) - 1
    assert [s["path"] for s in record.skipped] == [second]
    assert "changed" in record.skipped[0]["reason"]
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
    record = python_zipper.zip_part(Run(cfg, records, layout, CopyingRclone(), runtime, gate), job)
    assert record.size == python_zipper.MIN_CHUNK


# The format: sizes and CRC-32 in every local header, no data descriptor, local DOS time,
# and every reader a user may open a part with (Python, Info-ZIP, Java, libarchive, 7-Zip)

def local_headers(data: bytes) -> list[dict]:
    """Each entry's local header as written, beside the central directory's ZipInfo."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    rows = []
    for info in infos:
        at = info.header_offset
        (sig, version, flags, method, dostime, dosdate, crc, csize, usize, name_len,
         extra_len) = python_unzipper.LOCAL_HEADER.unpack_from(data, at)
        assert sig == b"PK\x03\x04"
        extra = data[at + 30 + name_len:at + 30 + name_len + extra_len]
        fields, i = {}, 0
        while i + 4 <= len(extra):
            tag, size = struct.unpack_from("<HH", extra, i)
            fields[tag] = extra[i + 4:i + 4 + size]
            i += 4 + size
        assert i == len(extra)
        zip64 = csize == 0xFFFFFFFF or usize == 0xFFFFFFFF
        if zip64:  # the ZIP64 extra field of a local header: original size, then compressed size
            assert csize == usize == 0xFFFFFFFF and len(fields[1]) == 16
            usize, csize = struct.unpack("<QQ", fields[1])
        rows.append({"info": info, "version": version, "flags": flags, "method": method, "crc": crc,
                     "csize": csize, "usize": usize, "zip64": zip64, "fields": fields,
                     "date_time": ((dosdate >> 9) + 1980, (dosdate >> 5) & 15, dosdate & 31,
                                   dostime >> 11, (dostime >> 5) & 63, (dostime & 31) * 2),
                     "data_end": at + 30 + name_len + extra_len + csize})
    return rows


def assert_no_data_descriptor(data: bytes) -> list[dict]:
    rows = local_headers(data)
    assert rows
    for row, after in zip(rows, rows[1:] + [None]):
        info = row["info"]
        assert row["flags"] & 0x08 == 0, info.filename
        assert row["flags"] == info.flag_bits  # (0, or 0x800 for a UTF-8 name)
        assert row["method"] == zipfile.ZIP_STORED
        assert (row["crc"], row["csize"], row["usize"]) == (info.CRC, info.compress_size, info.file_size)
        assert row["date_time"] == info.date_time
        assert set(row["fields"]) == ({0x5455, 0x0001} if row["zip64"] else {0x5455})
        assert len(row["fields"][0x5455]) == 5 and row["fields"][0x5455][0] == 1  # UT: the mtime only
        # Nothing between one entry's data and the next header (or the central directory).
        next_at = after["info"].header_offset if after else row["data_end"]
        assert row["data_end"] == next_at
        assert data[next_at:next_at + 4] == (b"PK\x03\x04" if after else b"PK\x01\x02")
    return rows


@pytest.mark.parametrize("which", ["small", "multipart", "mixed"])
def test_every_local_header_has_the_sizes_and_crc_and_no_data_descriptor_follows(request, which):
    part = request.getfixturevalue(which)
    rows = assert_no_data_descriptor(part.data())
    by_path = {p: c for p, c, _ in part.files}
    for row in rows:
        content = by_path[row["info"].filename]
        assert row["crc"] == zlib.crc32(content) and row["usize"] == len(content)
        assert not row["zip64"]


def test_files_over_the_bound_are_read_twice_and_the_rest_once(mixed):
    assert mixed.read_twice == ["bound/over.bin", "bound/several blocks.bin"]


def test_mixed_part_roundtrip_through_the_unzipper(mixed):
    assert mixed.extract() == len(MIXED_FILES)
    for path, content, mtime in MIXED_FILES:
        target = os.path.join(mixed.out, path)
        with open(target, "rb") as fh:
            assert fh.read() == content
        assert os.stat(target).st_mtime_ns == mtime_ns(mtime)


class FlippingRuntime(Runtime):
    """Rewrites one byte of a file (size and mtime kept) at the n-th check: during the CRC
    pass of a file read twice, so the second read gives other bytes than the first."""

    def __init__(self, path: str, at_check: int):
        super().__init__()
        self.path, self.at_check, self.checks = path, at_check, 0

    def check(self) -> None:
        super().check()
        self.checks += 1
        if self.checks == self.at_check:
            st = os.stat(self.path)
            with open(self.path, "r+b") as fh:
                first = fh.read(1)
                fh.seek(0)
                fh.write(bytes([first[0] ^ 0xFF]))
            os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("in_place", [True, False])
def test_file_changed_between_the_two_reads_fails_the_part(records, tmp_path, monkeypatch, in_place):
    monkeypatch.setattr(python_zipper, "IN_MEMORY_MAX", BOUND)
    staging = str(tmp_path / "staging")
    rows = stage(staging, [("a", b"small", "2001-09-09T01:46:40Z"),
                           ("big.bin", rand_bytes(2 * MIB + 5, 21), "2001-09-09T01:46:40Z")])
    for r in rows:
        ns = mtime_ns(r["mtime"])
        os.utime(os.path.join(staging, r["path"]), ns=(ns, ns))
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    where = {r["path"]: os.path.join(staging, r["path"]) for r in rows} if in_place else staging
    # write_zip's checks: one per file, then one per MiB block of the CRC pass: the 3rd is
    # inside big.bin's (the sink checks its own runtime)
    runtime = FlippingRuntime(os.path.join(staging, "big.bin"), at_check=3)
    sink = python_zipper.S3Sink(records, "flipped", CHUNK, Runtime())
    with pytest.raises(MigrationError) as info:
        python_zipper.write_zip(sink, job, where, set(), runtime)
    message = str(info.value)
    assert runtime.checks >= 3
    assert "'big.bin'" in message and "CRC-32" in message and "second read" in message
    assert ("changed at SOURCE" in message) == in_place
    sink.abort()


def test_file_that_grew_after_the_crc_pass_fails_the_part(records, tmp_path, monkeypatch):
    monkeypatch.setattr(python_zipper, "IN_MEMORY_MAX", BOUND)
    staging = str(tmp_path / "staging")
    rows = stage(staging, [("big.bin", rand_bytes(BOUND * 3, 22), "2001-09-09T01:46:40Z")])
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    real_seek = io.FileIO.seek

    class Growing(io.FileIO):  # another writer appends between the two reads
        def seek(self, *a):
            with open(os.path.join(staging, "big.bin"), "ab") as fh:
                fh.write(b"more")
            return real_seek(self, *a)
    monkeypatch.setattr(python_zipper, "open", lambda p, mode, buffering: Growing(p, "rb"), raising=False)
    sink = python_zipper.S3Sink(records, "grew", CHUNK, Runtime())
    with pytest.raises(MigrationError) as info:
        python_zipper.write_zip(sink, job, staging, set(), Runtime())
    assert "'big.bin'" in str(info.value) and "second read" in str(info.value)


def write_zip_with_descriptors(sink, job, staging, skip, runtime):
    """A part as the zipper wrote them before: zipfile's own entries, which on a stream that
    cannot seek put the CRC-32 and sizes in a data descriptor after the data."""
    entries = []
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in job.files:
            mtime = parse_mtime(f["mtime"])
            info = zipfile.ZipInfo(f["path"], date_time=python_zipper.dos_time(mtime))
            info.external_attr = (0o100644 << 16)
            info.extra = python_zipper.ut_extra(mtime)
            info.file_size = f["size"]
            with open(os.path.join(staging, f["path"]), "rb") as src:
                content = src.read()
            with zf.open(info, "w") as dst:
                dst.write(content)
            entries.append({"path": f["path"], "offset": info.header_offset, "size": len(content),
                            "crc32": f"{info.CRC:08x}", "md5": hashlib.md5(content).hexdigest(),
                            "mtime": f["mtime"]})
    return entries


@pytest.fixture
def old_format(records, tmp_path):
    return Part(records, tmp_path, SMALL_FILES + BIG_FILES, writer=write_zip_with_descriptors)


def test_parts_written_before_with_data_descriptors_still_restore(old_format):
    data = old_format.data()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert all(i.flag_bits & 0x08 for i in zf.infolist())  # they do have descriptors
    assert data.count(b"PK\x07\x08") >= len(old_format.files)
    assert old_format.extract() == len(old_format.files)
    for path, content, mtime in old_format.files:
        target = os.path.join(old_format.out, path)
        with open(target, "rb") as fh:
            assert fh.read() == content
        assert os.stat(target).st_mtime_ns == mtime_ns(mtime)


# ZIP64: zipfile.ZIP64_LIMIT lowered while the part is written, so that small entries get every
# ZIP64 field a part over 4 GiB has (sizes in the local and central extra fields, offsets in
# the central one, the ZIP64 end records); the readers then meet the real layout.

@pytest.fixture
def zip64(records, tmp_path, monkeypatch):
    monkeypatch.setattr(python_zipper, "IN_MEMORY_MAX", BOUND)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)
    part = Part(records, tmp_path, MIXED_FILES, key="work_files_zips/Z_Full.zip")
    monkeypatch.undo()  # read back with zipfile as it is
    return part


def test_zip64_fields_where_sizes_and_offsets_are_over_the_limit(zip64):
    data = zip64.data()
    rows = assert_no_data_descriptor(data)
    for row in rows:
        assert row["zip64"] == (row["usize"] > 1000)
        assert (row["version"] >= 45) == row["zip64"]
    assert any(r["zip64"] for r in rows) and not all(r["zip64"] for r in rows)
    assert b"PK\x06\x06" in data[-200:] and b"PK\x06\x07" in data[-200:]  # ZIP64 end record, locator
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        for path, content, _ in MIXED_FILES:
            assert zf.read(path) == content
    assert zip64.extract() == len(MIXED_FILES)
    for path, content, _ in MIXED_FILES:
        with open(os.path.join(zip64.out, path), "rb") as fh:
            assert fh.read() == content


# DOS time: local time of the zipping machine; the UT field: the exact UTC mtime

ZIP_IN_A_SUBPROCESS = r"""
import json, sys
import python_zipper
from common_s3 import Runtime

class FileSink:  # like S3Sink: tell() but no seek()
    def __init__(self, path): self.fh = open(path, "wb")
    def write(self, b): return self.fh.write(b)
    def tell(self): return self.fh.tell()
    def seekable(self): return False
    def seek(self, *a): raise OSError("not seekable")
    def flush(self): self.fh.flush()

out, staging, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sink = FileSink(out)
job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
python_zipper.write_zip(sink, job, staging, set(), Runtime())
sink.fh.close()
"""

TIME_FILES = [("summer", b"s", "2021-07-01T22:30:00Z"), ("winter", b"w", "2021-12-31T23:59:58.5Z"),
              ("epoch+", b"e", "1980-01-02T00:00:00Z")]


def zip_with_tz(tmp_path, tz: str) -> bytes:
    staging = str(tmp_path / "tz-staging")
    rows = stage(staging, TIME_FILES)
    out = str(tmp_path / "tz.zip")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", ZIP_IN_A_SUBPROCESS, out, staging, json.dumps(rows)], check=True,
                   cwd=repo, env={**os.environ, "TZ": tz, "PYTHONPATH": repo}, timeout=60)
    with open(out, "rb") as fh:
        return fh.read()


@pytest.mark.parametrize("tz, offset_s", [("UTC0", 0), ("IST-5:30", 19800), ("PST8PDT,M3.2.0,M11.1.0", None)])
def test_dos_time_is_local_time_and_the_ut_field_the_exact_utc_mtime(tmp_path, tz, offset_s):
    """POSIX TZ strings: no tz database needed; the third has summer time (-7 h in July, -8 h
    in December)."""
    data = zip_with_tz(tmp_path, tz)
    rows = {r["info"].filename: r for r in assert_no_data_descriptor(data)}
    for path, _content, mtime in TIME_FILES:
        t = parse_mtime(mtime)
        offset = offset_s if offset_s is not None else (-7 * 3600 if "-07-" in mtime else -8 * 3600)
        local = datetime.datetime.fromtimestamp(t, datetime.timezone.utc) + datetime.timedelta(seconds=offset)
        want = (local.year, local.month, local.day, local.hour, local.minute, local.second // 2 * 2)
        assert rows[path]["date_time"] == rows[path]["info"].date_time == want, (path, tz)
        assert struct.unpack("<Bi", rows[path]["fields"][0x5455]) == (1, int(t))


def test_dos_time_follows_time_localtime():
    for t in (1_000_000_000, 1_625_178_600, 1_700_000_000.75):
        lt = time.localtime(t)
        assert python_zipper.dos_time(t) == (lt.tm_year, lt.tm_mon, lt.tm_mday, lt.tm_hour, lt.tm_min, lt.tm_sec)


@pytest.fixture
def other_tz():
    """This process in another time zone for the test (UTC+9:45), then back."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ-9:45"
    time.tzset()
    yield "XYZ-9:45"
    if old is None:
        os.environ.pop("TZ")
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_restored_mtimes_do_not_depend_on_the_unzippers_time_zone(small, other_tz):
    """The unzipper sets each file's mtime from the map (a part's files) or from the UT field
    (an original part, ``_zip_mtime``), never from the DOS field, which is the zipping machine's
    local time."""
    assert small.extract() == len(small.files)
    for path, _content, mtime in small.files:
        assert os.stat(os.path.join(small.out, path)).st_mtime_ns == mtime_ns(mtime)
    with zipfile.ZipFile(io.BytesIO(small.data())) as zf:
        for info, (_path, _content, mtime) in zip(zf.infolist(), small.files):
            assert python_unzipper._zip_mtime(info) == int(parse_mtime(mtime))


# Other readers

def needed_tool(name: str, package: str) -> str:
    """A reader every machine that runs the tests should have: skipped where it is missing,
    except under CI=true, where the test fails."""
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed (package {package}); under CI=true this test fails")
    pytest.skip(f"{name} is not installed (apt-get install {package}); in CI this test fails instead")


def optional_tool(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"{' or '.join(names)} not installed")


READERS = ["mixed", "multipart", "zip64"]


def expected_lines(part) -> list[str]:
    return [f"{path}\t{len(content)}\t{hashlib.md5(content).hexdigest()}\t{int(parse_mtime(mtime))}"
            for path, content, mtime in part.files]


def utf8_env(**extra) -> dict:
    return {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", **extra}


@pytest.mark.parametrize("which", READERS)
def test_info_zip_tests_and_extracts_every_entry_with_its_mtime(request, tmp_path, which):
    unzip = needed_tool("unzip", "unzip")
    part = request.getfixturevalue(which)
    archive = part.to_file(tmp_path)
    tested = subprocess.run([unzip, "-t", archive], capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "No errors detected" in tested.stdout
    assert tested.stdout.count("OK") == len(part.files)
    out = tmp_path / "unzipped"
    # Another time zone than the zipping one: Info-ZIP takes the mtime from the UT field.
    done = subprocess.run([unzip, "-q", "-o", archive, "-d", str(out)], capture_output=True, text=True,
                          env=utf8_env(TZ="XYZ+7"), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for path, content, mtime in part.files:
        target = out / path
        assert target.read_bytes() == content, path
        if parse_mtime(mtime) >= 0:  # Info-ZIP ignores a UT time before 1970 and takes the DOS field
            assert os.stat(target).st_mtime == int(parse_mtime(mtime)), path


JAVA_READER = r"""
import java.io.*;
import java.security.MessageDigest;
import java.util.Enumeration;
import java.util.concurrent.TimeUnit;
import java.util.zip.*;

/** Prints name, size, MD5 and mtime (s) of every entry, read with ZipInputStream ("stream",
 *  the local headers, front to back) or ZipFile ("file", the central directory). */
public class ReadZip {
    static String line(ZipEntry e, InputStream in) throws Exception {
        MessageDigest md = MessageDigest.getInstance("MD5");
        byte[] buf = new byte[1 << 16];
        long n = 0;
        for (int k; (k = in.read(buf)) > 0; ) { md.update(buf, 0, k); n += k; }
        StringBuilder hex = new StringBuilder();
        for (byte b : md.digest()) hex.append(String.format("%02x", b));
        return e.getName() + "\t" + n + "\t" + hex + "\t" + e.getLastModifiedTime().to(TimeUnit.SECONDS);
    }

    public static void main(String[] args) throws Exception {
        PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), true, "UTF-8");
        if (args[0].equals("stream")) {
            try (ZipInputStream in = new ZipInputStream(new BufferedInputStream(new FileInputStream(args[1])))) {
                for (ZipEntry e; (e = in.getNextEntry()) != null; ) out.println(line(e, in));
            }
        } else {
            try (ZipFile zf = new ZipFile(args[1])) {
                for (Enumeration<? extends ZipEntry> it = zf.entries(); it.hasMoreElements(); ) {
                    ZipEntry e = it.nextElement();
                    try (InputStream in = zf.getInputStream(e)) { out.println(line(e, in)); }
                }
            }
        }
    }
}
"""


@pytest.fixture(scope="module")
def java_reader(tmp_path_factory):
    """(java, classpath) with ReadZip compiled."""
    javac = needed_tool("javac", "openjdk-17-jdk-headless")
    java = needed_tool("java", "openjdk-17-jdk-headless")
    where = tmp_path_factory.mktemp("java")
    (where / "ReadZip.java").write_text(JAVA_READER)
    subprocess.run([javac, "-encoding", "UTF-8", "-d", str(where), str(where / "ReadZip.java")], check=True,
                   timeout=120)
    return java, str(where)


def run_java(java_reader, mode: str, archive: str) -> subprocess.CompletedProcess:
    java, classpath = java_reader
    return subprocess.run([java, "-cp", classpath, "ReadZip", mode, archive], capture_output=True,
                          timeout=120, env=utf8_env())


@pytest.mark.parametrize("mode", ["stream", "file"])
@pytest.mark.parametrize("which", READERS)
def test_java_reads_every_entry(request, tmp_path, java_reader, which, mode):
    part = request.getfixturevalue(which)
    done = run_java(java_reader, mode, part.to_file(tmp_path))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().splitlines() == expected_lines(part)


def test_java_zipinputstream_refuses_the_old_format(tmp_path, java_reader, old_format):
    """Why parts have no data descriptor: Java's streaming reader fails on a stored entry with one."""
    done = run_java(java_reader, "stream", old_format.to_file(tmp_path))
    assert done.returncode != 0
    assert b"only DEFLATED entries can have EXT descriptor" in done.stderr


@pytest.mark.parametrize("which", READERS)
def test_libarchive_lists_and_extracts_every_entry(request, tmp_path, which):
    bsdtar = optional_tool("bsdtar")
    part = request.getfixturevalue(which)
    archive = part.to_file(tmp_path)
    listed = subprocess.run([bsdtar, "-tf", archive], capture_output=True, timeout=120, env=utf8_env())
    assert listed.returncode == 0, listed.stderr
    # libarchive gives every UTF-8 name in NFC (an NFD name too, so café.txt comes out composed)
    nfc = [unicodedata.normalize("NFC", p) for p, _, _ in part.files]
    assert listed.stdout.decode().splitlines() == nfc
    out = tmp_path / "bsdtar"
    out.mkdir()
    done = subprocess.run([bsdtar, "-xf", archive, "-C", str(out)], capture_output=True, timeout=120,
                          env=utf8_env())
    assert done.returncode == 0, done.stderr
    for path, content, mtime in part.files:
        target = out / unicodedata.normalize("NFC", path)
        assert target.read_bytes() == content, path
        if parse_mtime(mtime) >= 0:  # libarchive reads a UT time before 1970 as unsigned (after 2100)
            assert os.stat(target).st_mtime == int(parse_mtime(mtime)), path


@pytest.mark.parametrize("which", READERS)
def test_7zip_tests_and_extracts_every_entry(request, tmp_path, which):
    seven = optional_tool("7z", "7zz")
    part = request.getfixturevalue(which)
    archive = part.to_file(tmp_path)
    tested = subprocess.run([seven, "t", archive], capture_output=True, text=True, timeout=120, env=utf8_env())
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "Everything is Ok" in tested.stdout
    out = tmp_path / "7z"
    done = subprocess.run([seven, "x", "-y", f"-o{out}", archive], capture_output=True, text=True,
                          timeout=120, env=utf8_env())
    assert done.returncode == 0, done.stdout + done.stderr
    for path, content, _mtime in part.files:
        assert (out / path).read_bytes() == content, path


class FileSink:
    """Like S3Sink for zipfile, into a local file: tell() but no seek()."""

    def __init__(self, path: str):
        self.fh = open(path, "wb")

    def write(self, data) -> int:
        return self.fh.write(data)

    def tell(self) -> int:
        return self.fh.tell()

    def seekable(self) -> bool:
        return False

    def seek(self, *_args) -> int:
        raise OSError("not seekable")

    def flush(self) -> None:
        self.fh.flush()


@pytest.mark.skipif(os.environ.get("ZIP_OVER_4GIB") != "1",
                    reason="writes and reads a zip of 4 GiB (about a minute); ZIP_OVER_4GIB=1 runs it")
def test_part_over_4_gib_with_real_zip64_fields(tmp_path):
    """A file of 4 GiB + 4097 bytes (sparse at the source, a few bytes set) between two small
    ones: its local header has the ZIP64 sizes, the file after it a ZIP64 offset, and every
    reader at hand reads the whole part."""
    staging = tmp_path / "staging"
    staging.mkdir()
    huge = 4 * 1024**3 + 4097
    with open(staging / "huge.bin", "wb") as fh:
        fh.truncate(huge)
        for at in (0, 2**31, 2**32 - 1, 2**32, huge - 1):
            fh.seek(at)
            fh.write(bytes([at % 251 + 1]))
    (staging / "before.txt").write_bytes(b"before")
    (staging / "after.txt").write_bytes(b"after")
    rows = [{"path": p, "size": os.path.getsize(staging / p), "mtime": "2024-02-29T12:00:00Z"}
            for p in ("before.txt", "huge.bin", "after.txt")]
    job = python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=rows)
    archive = str(tmp_path / "big.zip")
    sink = FileSink(archive)
    started = time.monotonic()
    entries = python_zipper.write_zip(sink, job, str(staging), set(), Runtime())
    sink.fh.close()
    print(f"\nwrote {os.path.getsize(archive) / 2**30:.2f} GiB in {time.monotonic() - started:.1f} s")
    assert entries[2]["offset"] > 2**32
    with open(archive, "rb") as fh:
        head = fh.read(entries[1]["offset"] + 200)
        fh.seek(os.path.getsize(archive) - 400)
        tail = fh.read()
    sig, _v, flags, _m, _t, _d, crc, csize, usize, name_len, extra_len = \
        python_unzipper.LOCAL_HEADER.unpack_from(head, entries[1]["offset"])
    assert flags & 0x08 == 0 and csize == usize == 0xFFFFFFFF and f"{crc:08x}" == entries[1]["crc32"]
    extra = head[entries[1]["offset"] + 30 + name_len:][:extra_len]
    assert struct.pack("<HHQQ", 1, 16, huge, huge) in extra
    assert b"PK\x06\x06" in tail and b"PK\x06\x07" in tail
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        assert [i.file_size for i in infos] == [6, huge, 5]
        assert infos[2].header_offset == entries[2]["offset"]
        assert zf.read("after.txt") == b"after" and zf.read("before.txt") == b"before"
    readers = []
    if shutil.which("unzip"):
        readers.append(["unzip", "-tq", archive])
    if shutil.which("java") and shutil.which("javac"):
        (tmp_path / "ReadZip.java").write_text(JAVA_READER)
        subprocess.run(["javac", "-d", str(tmp_path), str(tmp_path / "ReadZip.java")], check=True)
        readers += [["java", "-cp", str(tmp_path), "ReadZip", mode, archive] for mode in ("stream", "file")]
    for tool in ("7z", "bsdtar"):
        if shutil.which(tool):
            readers.append([tool, "t", archive] if tool == "7z" else [tool, "-tvf", archive])
    for command in readers:
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        print(f"{' '.join(command[:2])} ... : exit {done.returncode} in {time.monotonic() - started:.1f} s")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        if command[0] == "java":
            md5 = [e["md5"] for e in entries]
            assert [line.split("\t")[2] for line in done.stdout.splitlines()] == md5
