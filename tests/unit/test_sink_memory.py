"""S3Sink against MemoryRecords: small chunks (the store has no 5 MiB minimum, so a part of
fifty chunks costs nothing), create-only publication over an object already there, faults
in the middle of an upload, and a worker whose claim is lost while it zips.

test_zip_roundtrip.py covers the zip itself, the ETag at 5 MiB chunk boundaries on moto, and
the interleaving of a failed chunk with the writer (a gated Stubber); none of that is here.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from botocore.exceptions import ReadTimeoutError

import common_s3
import python_zipper
from common_s3 import PartRecord, ClaimLost, Claims, Layout, Runtime, S3AuthError, S3Error, Skipped
from memstore import MemoryRecords
from python_zipper import ObjectExists, S3Sink, SinkOptions, expected_etag

CHUNK = 1024
KEY = "work_files_zips/F_Full.zip"


@pytest.fixture
def records(make_cfg, instant_stop) -> MemoryRecords:
    return MemoryRecords(make_cfg(), stop=instant_stop)


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def stream(sink: S3Sink, data: bytes, piece: int = 333) -> None:
    """Write in pieces that do not line up with chunks, then finish."""
    for start in range(0, len(data), piece):
        sink.write(data[start:start + piece])
    sink.finish()


@pytest.mark.parametrize("size", [0, CHUNK - 1, CHUNK, CHUNK + 1, 50 * CHUNK + 7])
def test_single_put_and_multipart_give_the_expected_etag(records, size):
    data = data_of(size, size)
    sink = S3Sink(records, KEY, CHUNK, Runtime(), SinkOptions(uploaders=3))  # parts may land out of order
    stream(sink, data)
    assert sink.multipart is (size > CHUNK)
    assert len(sink.chunk_md5s) == max(1, -(-size // CHUNK))
    head = records.head(KEY)
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"') == sink.etag == expected_etag(sink.chunk_md5s, multipart=sink.multipart)
    assert records.get_bytes(KEY) == data and sink.whole_md5() == hashlib.md5(data).hexdigest()
    assert records.list_uploads("") == {}
    if not sink.multipart:  # the chunk's MD5 is the whole object's: its bytes were not hashed twice
        assert sink.md5.digest() == hashlib.md5().digest()


@pytest.mark.parametrize("size", [CHUNK // 2, 3 * CHUNK])
def test_create_only_publication_over_an_object_is_refused_and_can_be_made_once_cleared(records, size):
    theirs = records.put_bytes(KEY, b"another attempt's object")
    sink = S3Sink(records, KEY, CHUNK, Runtime(), SinkOptions(create_only=True))
    with pytest.raises(ObjectExists):
        stream(sink, data_of(size))
    assert records.get(KEY).etag == theirs and sink.etag is None
    assert records.list_uploads("") == ({KEY: [sink.upload_id]} if size > CHUNK else {})
    records.delete(KEY, IfMatch=f'"{theirs}"')
    sink.commit()  # the same request again, as clear_unrecorded does
    assert records.get_bytes(KEY) == data_of(size)
    assert sink.etag == expected_etag(sink.chunk_md5s, multipart=sink.multipart)
    assert records.list_uploads("") == {}


def test_abort_after_a_refused_publication_leaves_no_upload_and_the_object_alone(records):
    theirs = records.put_bytes(KEY, b"theirs")
    sink = S3Sink(records, KEY, CHUNK, Runtime(), SinkOptions(create_only=True))
    with pytest.raises(ObjectExists):
        stream(sink, data_of(3 * CHUNK))
    sink.abort()
    assert records.list_uploads("") == {} and records.get(KEY).etag == theirs


def test_an_abort_that_fails_leaves_the_upload_for_the_next_run(records, client_error):
    sink = S3Sink(records, KEY, CHUNK, Runtime())
    sink.write(data_of(2 * CHUNK + 1))
    records.fail("AbortMultipartUpload", client_error("InternalError", 500, "AbortMultipartUpload"))
    sink.abort()  # logged, not raised
    stale = python_zipper.list_stale_uploads(records, "work_files_zips/")
    assert list(stale) == [KEY]
    python_zipper.abort_uploads(records, KEY, stale[KEY])
    assert records.list_uploads("") == {}


@pytest.mark.parametrize("code,status,raised", [("InternalError", 500, S3Error),
                                                ("AccessDenied", 403, S3AuthError)])
def test_a_failed_chunk_upload_surfaces_and_nothing_is_published(records, client_error, code, status, raised):
    records.fail("UploadPart", client_error(code, status, "UploadPart"))
    sink = S3Sink(records, KEY, CHUNK, Runtime(), SinkOptions(uploaders=2))
    with pytest.raises(raised, match=code):  # from write() or from finish(), whichever comes first
        stream(sink, data_of(8 * CHUNK))
    assert records.head(KEY) is None
    sink.abort()
    assert records.list_uploads("") == {}


def test_a_failed_complete_surfaces_from_finish_and_the_upload_is_aborted(records):
    records.fail("CompleteMultipartUpload", ReadTimeoutError(endpoint_url="memstore"))
    sink = S3Sink(records, KEY, CHUNK, Runtime())
    with pytest.raises(S3Error, match="Read timeout"):
        stream(sink, data_of(3 * CHUNK))
    assert records.head(KEY) is None and list(records.list_uploads("")) == [KEY]
    sink.abort()
    assert records.list_uploads("") == {}


def part_job() -> python_zipper.PartJob:
    return python_zipper.PartJob(folder="F", stem="F", part="Full", gen=1, files=[])


def test_a_complete_whose_answer_was_lost_is_found_to_be_ours(records, client_error):
    """Completed, the answer lost, botocore's retry met 412: ObjectExists, yet the object is
    ours, and clear_unrecorded keeps it by its ETag instead of deleting it."""
    records.fail("CompleteMultipartUpload", client_error("PreconditionFailed", 412, "CompleteMultipartUpload"),
                 landed=True)
    sink = S3Sink(records, KEY, CHUNK, Runtime(), SinkOptions(create_only=True))
    with pytest.raises(ObjectExists):
        stream(sink, data_of(3 * CHUNK))
    ours = records.get(KEY).etag
    assert python_zipper.clear_unrecorded(records, Layout("work_files_zips/"), Runtime(), part_job(), sink) is None
    assert sink.etag == ours == expected_etag(sink.chunk_md5s, multipart=True)
    assert records.get(KEY).etag == ours


def test_clear_unrecorded_replaces_an_unrecorded_object_and_keeps_a_recorded_one(records):
    layout = Layout("work_files_zips/")
    records.put_bytes(KEY, b"left by a killed attempt")
    sink = S3Sink(records, KEY, CHUNK, Runtime(), SinkOptions(create_only=True))
    with pytest.raises(ObjectExists):
        stream(sink, data_of(2 * CHUNK))
    assert python_zipper.clear_unrecorded(records, layout, Runtime(), part_job(), sink) is None
    assert records.get_bytes(KEY) == data_of(2 * CHUNK)
    record = PartRecord(key=KEY, size=2 * CHUNK, sha256="0" * 64, entries_key="e", worker="another")
    records.put_json(layout.part_record("F", "Full"), record.to_json())
    again = S3Sink(records, KEY, CHUNK, Runtime(), SinkOptions(create_only=True))
    with pytest.raises(ObjectExists):
        stream(again, data_of(2 * CHUNK, seed=1))
    assert python_zipper.clear_unrecorded(records, layout, Runtime(), part_job(), again) == record
    assert records.get_bytes(KEY) == data_of(2 * CHUNK)


@pytest.mark.parametrize("size", [CHUNK // 2, 3 * CHUNK])
def test_a_worker_whose_claim_was_taken_over_never_publishes(make_cfg, instant_stop, monkeypatch, size):
    """The unit's claim is taken over while its part is zipped: the sink's commit confirms the
    claim first, the renewal is refused, and nothing appears at the part's key."""
    now = [1000.0]
    monkeypatch.setattr(common_s3, "lease_clock", lambda: now[0])
    mine = MemoryRecords(make_cfg(WORKER_ID="w0", LEASE_SECONDS="60"), stop=instant_stop)
    a = Claims(mine, Layout("p/"), Runtime(), "zipper")
    b = Claims(mine.twin(make_cfg(WORKER_ID="w1", LEASE_SECONDS="60")), Layout("p/"), Runtime(), "zipper")
    raised: list[Exception] = []

    def unit() -> None:
        sink = S3Sink(mine, KEY, CHUNK, a.runtime, SinkOptions(create_only=True))
        try:
            sink.write(data_of(size))
            b.take("F", "Full")
            with a.current().lock:  # no renewal by the thread before the takeover
                now[0] += 61
                assert not isinstance(b.take("F", "Full"), Skipped)
            sink.finish()
        except Exception as exc:  # run() turns it into Skipped("lost"); it must be ClaimLost
            raised.append(exc)
            raise
        finally:
            sink.abort()
    try:
        assert a.run("F", "Full", unit, done=lambda: False) == Skipped("lost", "taken over by w1")
    finally:
        a.runtime.stop.set()
        b.runtime.stop.set()
    assert [type(e) for e in raised] == [ClaimLost]
    assert mine.head(KEY) is None and mine.list_uploads("") == {}
