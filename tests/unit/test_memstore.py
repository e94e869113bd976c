"""MemoryRecords (tests/memstore.py) behaves like S3 where Claims and S3Sink rely on it.

The tests taking ``store`` run twice, on MemoryRecords and on a real Records on moto
in-process, so the in-memory store cannot drift from what moto answers; the rest check what
only the store has (faults, its clock, ``enforce=False``, many threads at once).
"""

from __future__ import annotations

import hashlib
import threading

import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

import python_zipper
from common_s3 import Capabilities, KeyMissing, RecordExists, Records, S3Error
from memstore import MemoryRecords

BUCKET = "unit-bucket"
MIB = 1024 * 1024


@pytest.fixture(params=["memory", "moto"])
def store(request, make_cfg, instant_stop) -> Records:
    """The same test on both: MemoryRecords, and Records on moto (probed, so create-only is sent)."""
    if request.param == "memory":
        return MemoryRecords(make_cfg(), stop=instant_stop)
    records = Records(request.getfixturevalue("s3"), make_cfg(), stop=instant_stop)
    records.probe("p/_probe/")
    return records


def seed(records: Records, keys: list[str]) -> None:
    """Empty objects at ``keys``, quickly: straight into moto's backend, or the store's dict."""
    if isinstance(records, MemoryRecords):
        for key in keys:
            records.put_bytes(key, b"")
    else:
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key in keys:
            backend.put_object(BUCKET, key, b"")


def test_put_then_read_back_with_the_md5_as_etag(store, tmp_path):
    data = bytes(range(256)) * 3
    etag = store.put_bytes("a/b.bin", data, content_type="application/zip")
    assert etag == hashlib.md5(data).hexdigest()
    head = store.head("a/b.bin")
    assert head["ContentLength"] == len(data) and head["ETag"] == f'"{etag}"'
    assert head["LastModified"].tzinfo is not None
    got = store.get("a/b.bin")
    assert (got.body, got.etag) == (data, etag)
    with store.open("a/b.bin") as (body, open_etag):
        assert body.read(10) == data[:10] and body.read() == data[10:] and open_etag == etag
    store.download("a/b.bin", str(tmp_path / "f"))
    assert (tmp_path / "f").read_bytes() == data


def test_a_missing_key_is_none_for_reads_and_key_missing_for_streams(store, tmp_path):
    assert store.head("nothing") is None
    assert store.get("nothing") is None and store.get_json("nothing") is None
    with pytest.raises(KeyMissing):
        with store.open("nothing"):
            pass
    with pytest.raises(KeyMissing):
        store.download("nothing", str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()
    store.delete("nothing")  # S3 deletes a missing key without complaint


def test_conditional_puts_are_enforced(store):
    first = store.put_bytes("k", b"one", create_only=True)
    with pytest.raises(RecordExists):
        store.put_bytes("k", b"two", create_only=True)
    with pytest.raises(RecordExists):
        store.put_bytes("k", b"two", IfNoneMatch="*")
    with pytest.raises(RecordExists):
        store.put_bytes("k", b"two", IfMatch='"00000000000000000000000000000000"')
    assert store.get_bytes("k") == b"one"
    second = store.put_bytes("k", b"two", IfMatch=f'"{first}"')
    assert store.get("k").etag == second != first
    with pytest.raises(RecordExists):  # the ETag it was made for is gone: compare-and-swap
        store.put_bytes("k", b"three", IfMatch=f'"{first}"')
    with pytest.raises(KeyMissing):  # If-Match where no object is: 404, not 412 (moto and AWS)
        store.put_bytes("absent", b"x", IfMatch=f'"{first}"')
    assert store.put_once("k", b"two") is True and store.put_once("k", b"other") is False


def test_delete_if_match_deletes_only_that_object(store):
    etag = store.put_bytes("k", b"one")
    with pytest.raises(RecordExists):
        store.delete("k", IfMatch='"00000000000000000000000000000000"')
    assert store.get_bytes("k") == b"one"
    store.delete("k", IfMatch=f'"{etag}"')
    assert store.head("k") is None
    with pytest.raises(KeyMissing):
        store.delete("k", IfMatch=f'"{etag}"')


def test_multipart_etag_is_the_md5_of_the_chunk_md5s(store):
    chunks = [bytes([n]) * (5 * MIB) for n in range(2)] + [b"tail"]  # moto wants 5 MiB but for the last
    upload = store.start_upload("big.zip", "application/zip")
    parts = [{"PartNumber": n, "ETag": upload.upload_part(n, c, hashlib.md5(c).digest())}
             for n, c in enumerate(chunks, 1)]
    assert store.list_uploads("big") == {"big.zip": [upload.upload_id]}
    etag = upload.complete(parts, create_only=True)
    assert etag == python_zipper.expected_etag([hashlib.md5(c).digest() for c in chunks]) and etag.endswith("-3")
    assert store.head("big.zip")["ETag"] == f'"{etag}"' and store.get_bytes("big.zip") == b"".join(chunks)
    assert store.list_uploads("") == {}
    one = store.start_upload("one.zip", "application/zip")
    tag = one.upload_part(1, b"x", None)
    assert one.complete([{"PartNumber": 1, "ETag": tag}], create_only=False) == \
        python_zipper.expected_etag([hashlib.md5(b"x").digest()], multipart=True)


def test_create_only_complete_over_an_object_is_refused_and_keeps_the_upload(store):
    store.put_bytes("k.zip", b"theirs")
    upload = store.start_upload("k.zip", "application/zip")
    parts = [{"PartNumber": 1, "ETag": upload.upload_part(1, b"ours", None)}]
    with pytest.raises(RecordExists):
        upload.complete(parts, create_only=True)
    assert store.get_bytes("k.zip") == b"theirs"
    assert store.list_uploads("k") == {"k.zip": [upload.upload_id]}
    with pytest.raises(S3Error):  # a part named with a wrong ETag: InvalidPart
        upload.complete([{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}], create_only=False)
    upload.abort()
    assert store.list_uploads("") == {}
    with pytest.raises(S3Error) as info:  # NoSuchUpload is not a missing key
        upload.abort()
    assert not isinstance(info.value, KeyMissing)


def test_listing_with_prefix_and_delimiter(store):
    seed(store, ["p/a/1", "p/a/2", "p/b/1", "p/a", "p/c", "p/d.json", "q/a/1", "p-other"])
    flat = list(store.list_keys("p/"))
    assert [i["Key"] for i in flat] == ["p/a", "p/a/1", "p/a/2", "p/b/1", "p/c", "p/d.json"]
    assert all(i["Size"] == 0 and i["ETag"] == f'"{hashlib.md5(b"").hexdigest()}"' for i in flat)
    grouped = list(store.list_keys("p/", delimiter="/"))
    assert [i for i in grouped if "Prefix" in i] == [{"Prefix": "p/a/"}, {"Prefix": "p/b/"}]
    assert [i["Key"] for i in grouped if "Key" in i] == ["p/a", "p/c", "p/d.json"]
    assert list(store.list_keys("nothing/")) == []


def test_listing_pages_cost_a_request_each(store):
    seed(store, [f"many/{i:04d}" for i in range(1001)])
    before = store.requests
    assert len(list(store.list_keys("many/"))) == 1001
    assert store.requests - before == 2


def test_probe_finds_conditions_enforced_and_leaves_nothing(store):
    caps = store.probe("p/_probe/")
    assert (caps.create_only, caps.compare_and_swap, caps.send_conditions) == (True, True, True)
    assert list(store.list_keys("")) == []


# What only the store has

def test_enforce_false_ignores_conditions_like_rclone_serve_s3(make_cfg):
    store = MemoryRecords(make_cfg(), enforce=False)
    assert store.probe("p/_probe/").describe().startswith("conditional writes ignored")
    first = store.put_bytes("k", b"one", IfNoneMatch="*")
    store.put_bytes("k", b"two", IfNoneMatch="*")
    store.put_bytes("k", b"three", IfMatch=f'"{first}"')
    store.delete("k", IfMatch='"00000000000000000000000000000000"')
    assert store.head("k") is None


def test_a_wrong_content_md5_is_refused(make_cfg):
    store = MemoryRecords(make_cfg())
    with pytest.raises(S3Error, match="BadDigest"):
        store.put_bytes("k", b"body", md5=hashlib.md5(b"other").digest())
    assert store.head("k") is None


def test_faults_come_before_or_after_the_effect_and_are_counted(make_cfg, client_error):
    store = MemoryRecords(make_cfg())
    store.fail("PutObject", client_error("InternalError", 500, "PutObject"))
    with pytest.raises(S3Error, match="InternalError"):
        store.put_bytes("k", b"x")
    assert store.head("k") is None
    store.fail("PutObject", TimeoutError("answer lost"), landed=True)
    with pytest.raises(TimeoutError):
        store.put_bytes("k", b"x")
    assert store.get_bytes("k") == b"x"
    assert store.put_bytes("k", b"y") and store.requests == 5  # three PUTs, a HEAD, a GET


def test_last_modified_and_age_follow_the_stores_clock(make_cfg):
    now = [1_700_000_000.0]
    store = MemoryRecords(make_cfg(), clock=lambda: now[0])
    store.put_bytes("k", b"x")
    now[0] += 90.5
    got = store.get("k")
    assert got.last_modified.timestamp() == 1_700_000_000 and got.age_s == 90
    assert next(store.list_keys(""))["LastModified"] == got.last_modified


def test_twins_share_the_objects_not_the_counts_or_faults(make_cfg, client_error):
    a = MemoryRecords(make_cfg(WORKER_ID="a"))
    b = a.twin(make_cfg(WORKER_ID="b"))
    a.put_bytes("k", b"x")
    a.fail("GetObject", client_error("AccessDenied", 403))
    assert b.get_bytes("k") == b"x" and (a.requests, b.requests) == (1, 1)


def test_create_only_from_many_threads_has_one_winner(make_cfg):
    store = MemoryRecords(make_cfg())
    start = threading.Barrier(16)
    won = []

    def race(n: int) -> None:
        start.wait()
        won.append(store.put_once("k", f"{n}".encode()))
    threads = [threading.Thread(target=race, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won.count(True) == 1 and store.caps == Capabilities(True, True, True, md5_checked=True)
