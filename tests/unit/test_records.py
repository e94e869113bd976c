"""Records: strict reads, Content-MD5 writes, create-only writes, listing, and the probe."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from botocore.exceptions import ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

import common_s3
from common_s3 import (Capabilities, MigrationError, RecordError, RecordExists, Records, S3AuthError, S3Error,
                       S3NotFoundError)

BUCKET = "unit-bucket"


def body(data: bytes) -> StreamingBody:
    return StreamingBody(io.BytesIO(data), len(data))


def read(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def put_many(keys) -> None:
    """Create objects straight in moto's backend: thousands in a fraction of a second."""
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        backend.put_object(BUCKET, key, b"")


@pytest.fixture
def stubbed(stub_client, make_cfg, instant_stop):
    """(Records, Stubber) on a client that answers only what the test queues."""
    records = Records(stub_client, make_cfg(), stop=instant_stop)
    with Stubber(stub_client) as stubber:
        yield records, stubber
        stubber.assert_no_pending_responses()


# Reads

def test_missing_key_reads_as_none(records):
    assert records.get_json("work_files_zips/_parts/x/Full.json") is None
    assert records.get_bytes("nothing/here") is None
    assert records.head("nothing/here") is None


def test_json_round_trip(records):
    obj = {"name": "日本 #x", "n": 3, "nested": {"a": [1, 2]}}
    records.put_json("rec/a.json", obj)
    assert records.get_json("rec/a.json") == obj


@pytest.mark.parametrize("bad", [b"{not json", b"", b"\xff\xfe\x00", b'{"a": 1'])
def test_malformed_json_raises_naming_the_key_and_keeps_the_body(records, s3, bad):
    key = "work_files_zips/_parts/F/Full.json"
    s3.put_object(Bucket=BUCKET, Key=key, Body=bad)
    with pytest.raises(RecordError) as info:
        records.get_json(key)
    assert key in str(info.value)
    assert info.value.key == key
    assert info.value.exit_code == 3
    assert read(s3, key) == bad


def test_access_denied_is_an_auth_error_not_none(stubbed):
    records, stubber = stubbed
    stubber.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(S3AuthError) as info:
        records.get_json("k.json")
    assert info.value.key == "k.json"
    assert "AccessDenied" in str(info.value)


def test_missing_bucket_is_not_found_error(stubbed):
    records, stubber = stubbed
    stubber.add_client_error("get_object", service_error_code="NoSuchBucket", http_status_code=404)
    with pytest.raises(S3NotFoundError):
        records.get_bytes("k")


def test_server_errors_are_retried_then_raised(stubbed, instant_stop):
    records, stubber = stubbed
    for _ in range(3):  # S3_MAX_RETRIES=3
        stubber.add_client_error("get_object", service_error_code="InternalError", http_status_code=500)
    with pytest.raises(S3Error) as info:
        records.get_json("k.json")
    assert not isinstance(info.value, (S3AuthError, S3NotFoundError))
    assert info.value.key == "k.json"
    assert "InternalError" in str(info.value)
    assert len(instant_stop.waits) == 2


class FailingStream(io.RawIOBase):
    """A response body whose reading times out, as a dropped connection does."""

    def read(self, n=-1):
        raise ReadTimeoutError(endpoint_url="https://s3.example")


def test_body_read_timeouts_are_retried(stubbed, instant_stop):
    records, stubber = stubbed
    stubber.add_response("get_object", {"Body": StreamingBody(FailingStream(), 10)})
    stubber.add_response("get_object", {"Body": body(b'{"ok": 1}')})
    assert records.get_json("k.json") == {"ok": 1}
    assert len(instant_stop.waits) == 1


def test_body_read_failures_become_s3_errors_naming_the_key(stubbed):
    records, stubber = stubbed
    for _ in range(3):
        stubber.add_response("get_object", {"Body": StreamingBody(FailingStream(), 10)})
    with pytest.raises(Exception) as info:  # the type is what is checked
        records.get_json("work_files_zips/_map/g000001/index.json")
    assert isinstance(info.value, S3Error), f"{type(info.value).__name__}: {info.value}"
    assert info.value.key == "work_files_zips/_map/g000001/index.json"


def test_a_server_error_then_success(stubbed):
    records, stubber = stubbed
    stubber.add_client_error("get_object", service_error_code="SlowDown", http_status_code=503)
    stubber.add_response("get_object", {"Body": body(b'{"ok": true}')}, {"Bucket": BUCKET, "Key": "k"})
    assert records.get_json("k") == {"ok": True}


def test_head_raises_on_errors_other_than_missing(stubbed):
    records, stubber = stubbed
    stubber.add_client_error("head_object", service_error_code="403", http_status_code=403)
    with pytest.raises(S3AuthError):
        records.head("k")


def test_requests_are_counted(records):
    before = records.requests
    records.get_bytes("missing")
    records.put_bytes("k", b"x")
    assert records.requests - before == 2


# Writes

def test_put_bytes_sends_content_md5(stubbed):
    records, stubber = stubbed
    data = b"some record body \xe2\x9c\x93"
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    stubber.add_response("put_object", {"ETag": '"x"'},
                         {"Bucket": BUCKET, "Key": "k", "Body": data, "ContentMD5": md5,
                          "ContentType": "application/octet-stream"})
    records.put_bytes("k", data)


def test_put_json_is_utf8_json_with_md5(stubbed):
    records, stubber = stubbed
    obj = {"folder": "café", "n": 1}
    data = json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")
    stubber.add_response("put_object", {"ETag": '"x"'},
                         {"Bucket": BUCKET, "Key": "k.json", "Body": data,
                          "ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
                          "ContentType": "application/json; charset=utf-8"})
    records.put_json("k.json", obj)


def test_checksums_off_sends_no_content_md5(stub_client, make_cfg, instant_stop):
    records = Records(stub_client, make_cfg(S3_CHECKSUMS="off"), stop=instant_stop)
    sent = []
    stub_client.meta.events.register("before-parameter-build.s3.PutObject",
                                     lambda params, **kw: sent.append(dict(params)))
    with Stubber(stub_client) as stubber:
        stubber.add_response("put_object", {"ETag": '"x"'})
        records.put_bytes("k", b"x")
    assert len(sent) == 1
    assert "ContentMD5" not in sent[0]


def test_put_bytes_to_moto_is_accepted_and_read_back(records, s3):
    data = bytes(range(256)) * 10
    records.put_bytes("bin", data)
    assert read(s3, "bin") == data
    assert s3.head_object(Bucket=BUCKET, Key="bin")["ETag"].strip('"') == hashlib.md5(data).hexdigest()


def test_create_only_after_probe_refuses_a_second_write(records, s3):
    caps = records.probe("work_files_zips/_probe/")
    assert caps.create_only
    records.put_json("rec.json", {"who": "first"}, create_only=True)
    with pytest.raises(RecordExists):
        records.put_json("rec.json", {"who": "second"}, create_only=True)
    assert records.get_json("rec.json") == {"who": "first"}
    # A plain write still overwrites.
    records.put_json("rec.json", {"who": "third"})
    assert records.get_json("rec.json") == {"who": "third"}


def test_create_only_is_not_sent_before_the_server_is_known_to_enforce_it(stubbed):
    records, stubber = stubbed
    assert records.caps == Capabilities(False, False, False)
    stubber.add_response("put_object", {}, {"Bucket": BUCKET, "Key": "k", "Body": b"x", "ContentMD5": ANY,
                                            "ContentType": ANY})
    records.put_bytes("k", b"x", create_only=True)


def test_refused_create_only_write_is_record_exists(stubbed):
    records, stubber = stubbed
    records.caps = Capabilities(True, True, True)
    stubber.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412,
                             expected_params={"Bucket": BUCKET, "Key": "k", "Body": b"x",
                                              "ContentMD5": ANY, "ContentType": ANY, "IfNoneMatch": "*"})
    with pytest.raises(RecordExists):
        records.put_bytes("k", b"x", create_only=True)


PUT_ONCE = {"Bucket": BUCKET, "Key": "k", "Body": b"x", "ContentMD5": ANY, "ContentType": ANY,
            "IfNoneMatch": "*"}


def test_a_conflicting_conditional_write_is_tried_again(stubbed, monkeypatch):
    """409 ConditionalRequestConflict (AWS: another conditional write on the key is in flight)
    is not a refusal: the write is sent again, and here it succeeds."""
    monkeypatch.setattr(common_s3.time, "sleep", lambda s: None)
    records, stubber = stubbed
    records.caps = Capabilities(True, True, True)
    stubber.add_client_error("put_object", service_error_code="ConditionalRequestConflict",
                             http_status_code=409, expected_params=PUT_ONCE)
    stubber.add_response("put_object", {"ETag": '"e"'}, PUT_ONCE)
    assert records.put_once("k", b"x") is True
    stubber.assert_no_pending_responses()


def test_conflicts_that_never_end_leave_no_false_record(stubbed, monkeypatch):
    """Four 409s, then nothing at the key: neither "written" nor "another worker's record"."""
    monkeypatch.setattr(common_s3.time, "sleep", lambda s: None)
    records, stubber = stubbed
    records.caps = Capabilities(True, True, True)
    for _ in range(4):
        stubber.add_client_error("put_object", service_error_code="ConditionalRequestConflict",
                                 http_status_code=409, expected_params=PUT_ONCE)
    stubber.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    with pytest.raises(MigrationError, match="conflicting writes"):
        records.put_once("k", b"x")


def test_put_errors_are_typed(stubbed):
    records, stubber = stubbed
    stubber.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(S3AuthError) as info:
        records.put_bytes("k", b"x")
    assert info.value.op == "PutObject" and info.value.key == "k"


def test_delete(records, s3):
    records.put_bytes("gone", b"x")
    records.delete("gone")
    assert records.head("gone") is None


# Listing

def test_list_keys_paginates(records):
    put_many(f"many/{i:05d}" for i in range(2500))
    put_many(["manyother", "other/1"])
    keys = [item["Key"] for item in records.list_keys("many/")]
    assert len(keys) == 2500
    assert keys == sorted(keys)
    assert len(set(keys)) == 2500
    assert records.requests == 3  # three pages of at most 1000


def test_list_keys_with_delimiter_yields_common_prefixes(records):
    put_many(["p/a/1", "p/a/2", "p/b/1", "p/c", "p/d.json", "q/a/1"])
    items = list(records.list_keys("p/", delimiter="/"))
    prefixes = sorted(i["Prefix"] for i in items if "Prefix" in i)
    objects = sorted(i["Key"] for i in items if "Key" in i)
    assert prefixes == ["p/a/", "p/b/"]
    assert objects == ["p/c", "p/d.json"]


def test_common_prefixes_paginate_too(records):
    put_many(f"g/g{i:06d}/index.json" for i in range(1100))
    prefixes = [i["Prefix"] for i in records.list_keys("g/", delimiter="/")]
    assert len(prefixes) == 1100
    assert prefixes[0] == "g/g000000/" and prefixes[-1] == "g/g001099/"


def test_empty_listing(records):
    assert list(records.list_keys("nothing/")) == []


def test_list_errors_raise(stubbed):
    records, stubber = stubbed
    stubber.add_client_error("list_objects_v2", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(S3AuthError):
        list(records.list_keys("p/"))


# The probe

def test_probe_against_moto(records, s3):
    caps = records.probe("work_files_zips/_probe/")
    assert caps == Capabilities(create_only=True, compare_and_swap=True, send_conditions=True)
    assert records.caps == caps
    assert caps.describe() == "conditional writes enforced"
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def probe_key_params(**extra):
    return {"Bucket": BUCKET, "Key": ANY, "Body": b"probe", **extra}


def test_probe_against_a_server_that_ignores_conditions(stubbed):
    records, stubber = stubbed
    stubber.add_response("put_object", {}, probe_key_params())
    stubber.add_response("put_object", {}, probe_key_params(IfNoneMatch="*"))
    stubber.add_response("put_object", {}, probe_key_params(IfMatch=ANY))
    stubber.add_response("put_object", {}, probe_key_params(ContentMD5=ANY))  # a wrong MD5, accepted
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": ANY})
    caps = records.probe("work_files_zips/_probe/")
    assert caps == Capabilities(create_only=False, compare_and_swap=False, send_conditions=True)
    assert caps.describe() == "conditional writes ignored by the server"
    assert records.caps == caps


def test_probe_against_a_server_that_rejects_conditions(stubbed):
    records, stubber = stubbed
    stubber.add_response("put_object", {}, probe_key_params())
    stubber.add_client_error("put_object", service_error_code="NotImplemented", http_status_code=501)
    stubber.add_client_error("put_object", service_error_code="NotImplemented", http_status_code=501)
    stubber.add_client_error("put_object", service_error_code="BadDigest", http_status_code=400)
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": ANY})
    caps = records.probe("work_files_zips/_probe/")
    assert caps.send_conditions is False
    assert caps.create_only is False and caps.compare_and_swap is False
    assert caps.describe() == "conditional writes rejected by the server, Content-MD5 checked"
    assert caps.md5_checked is True


def test_probe_uses_one_key_under_the_probe_prefix_and_deletes_it(stubbed, make_cfg):
    records, stubber = stubbed
    keys = []
    stubber.add_response("put_object", {}, probe_key_params())
    stubber.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412)
    stubber.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412)
    stubber.add_response("put_object", {}, probe_key_params(ContentMD5=ANY))
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": ANY})
    records.s3.meta.events.register("before-parameter-build.s3.*",
                                    lambda params, **kw: keys.append(params.get("Key")))
    caps = records.probe("work_files_zips/_probe/")
    assert caps == Capabilities(True, True, True)
    assert len(keys) == 5 and len(set(keys)) == 1
    assert keys[0].startswith("work_files_zips/_probe/unit-worker-")


def test_probe_deletes_its_key_even_when_a_conditional_put_fails(stubbed):
    records, stubber = stubbed
    stubber.add_response("put_object", {}, probe_key_params())
    stubber.add_client_error("put_object", service_error_code="AccessDenied", http_status_code=403)
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": ANY})
    with pytest.raises(S3Error):
        records.probe("work_files_zips/_probe/")


# Completion records: written once

def test_put_once_writes_a_new_record(records):
    records.probe("work_files_zips/_probe/")
    assert records.put_json_once("done.json", {"part": "Full"}) is True
    assert records.get_json("done.json") == {"part": "Full"}


def test_put_once_accepts_its_own_earlier_write(records):
    records.probe("work_files_zips/_probe/")
    assert records.put_json_once("done.json", {"part": "Full"}) is True
    # A retry of the same write (its answer was lost) finds exactly its own body.
    assert records.put_json_once("done.json", {"part": "Full"}) is True


def test_put_once_keeps_another_workers_record(records):
    records.probe("work_files_zips/_probe/")
    assert records.put_json_once("done.json", {"worker": "a"}) is True
    assert records.put_json_once("done.json", {"worker": "b"}) is False
    assert records.get_json("done.json") == {"worker": "a"}


@pytest.mark.parametrize("code,status,checked", [("BadDigest", 400, True), ("InvalidRequest", 400, True),
                                                 ("NotImplemented", 501, False)])
def test_probe_of_content_md5_never_fails_the_start_on_an_unknown_refusal(stubbed, code, status, checked):
    records, stubber = stubbed
    stubber.add_response("put_object", {}, probe_key_params())
    stubber.add_response("put_object", {}, probe_key_params(IfNoneMatch="*"))
    stubber.add_response("put_object", {}, probe_key_params(IfMatch=ANY))
    stubber.add_client_error("put_object", service_error_code=code, http_status_code=status)
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": ANY})
    assert records.probe("work_files_zips/_probe/").md5_checked is checked


# What the map's mtimes are (MANIFEST_VERSION 2)

def test_a_manifest_of_own_mtimes_is_written_as_version_1_unchanged():
    from common_s3 import ManifestHeader, manifest_version
    assert manifest_version(None) == 1 and manifest_version(None, None) == 1
    header = ManifestHeader(type="folder", version=manifest_version(None), name="F")
    assert "mtime_kind" not in header.to_json() and header.to_json()["version"] == 1


def test_s3_lastmodified_times_make_version_2_which_this_code_reads_and_names():
    from common_s3 import MANIFEST_VERSION, SERVER_MTIME, ManifestHeader, manifest_version
    assert manifest_version(SERVER_MTIME) == 2 and manifest_version(None, SERVER_MTIME) == 2
    assert MANIFEST_VERSION == 2
    header = ManifestHeader.from_json("k", {"type": "folder", "version": 2, "mtime_kind": "server"})
    assert header.mtime_kind == SERVER_MTIME
    with pytest.raises(RecordError, match="mtime_kind"):
        ManifestHeader.from_json("k", {"type": "folder", "version": 2, "mtime_kind": "sundial"})
    with pytest.raises(common_s3.NewerFormat):
        ManifestHeader.from_json("k", {"type": "folder", "version": 3, "mtime_kind": "sundial"})


def test_a_plan_with_an_unknown_mtime_kind_is_refused():
    from common_s3 import PlanRecord
    base = {"generation": 1, "created_at": "", "source": "s:", "folders": []}
    assert PlanRecord.from_json("k", base).mtime_kind is None
    assert PlanRecord.from_json("k", {**base, "mtime_kind": "server"}).mtime_kind == "server"
    with pytest.raises(common_s3.NewerFormat):
        PlanRecord.from_json("k", {**base, "mtime_kind": "sundial"})


@pytest.mark.parametrize("ns", [0, 1_600_000_000_123_456_789, 1_600_000_000_000_000_001, 999_999_999])
def test_format_mtime_ns_round_trips_every_nanosecond(ns):
    assert common_s3.mtime_ns(common_s3.format_mtime_ns(ns)) == ns


def test_backend_type_of_an_on_the_fly_remote_needs_no_rclone_call():
    rclone = object.__new__(common_s3.Rclone)  # no binary: any call to rclone would fail
    assert rclone.backend_type(":s3,provider=Other,endpoint='http://x':bucket/p") == "s3"
    assert rclone.backend_type(":local:/data") == "local"
    assert rclone.backend_type("/data/x") == "local"


def test_backend_type_of_a_named_remote_comes_from_listremotes(monkeypatch):
    rclone = object.__new__(common_s3.Rclone)
    seen = []
    listing = '[{"name":"src","type":"s3","source":"environment","description":""},{"name":"d","type":"drive"}]'

    def run(args, **_kw):
        seen.append(args)
        return common_s3.RcloneResult(0, listing, "")
    monkeypatch.setattr(rclone, "run", run, raising=False)
    assert rclone.backend_type("src:bucket/tree") == "s3"
    assert rclone.backend_type("src,provider=Other:bucket") == "s3"
    assert rclone.backend_type("d:Work") == "drive"
    assert rclone.backend_type("gone:x") == ""
    assert seen and all(a == ["listremotes", "--json"] for a in seen)


def sent_sha256_headers(cfg, calls) -> list[str]:
    """The X-Amz-Content-SHA256 of each request the client of ``cfg`` signs, answered
    before it is sent (``before-send`` returns a response: nothing leaves the process)."""
    from botocore.awsrequest import AWSResponse

    class Raw:
        def stream(self):
            return iter([b""])

    client = common_s3.make_s3_client(cfg)
    seen: list[str] = []

    def answer(request, **_kwargs):
        seen.append(request.headers["X-Amz-Content-SHA256"].decode())
        return AWSResponse(request.url, 200, {"ETag": '"0"'}, Raw())

    client.meta.events.register("before-send.s3", answer)
    for call in calls:
        call(client)
    return seen


DATA = b"x" * 100_000


def part_uploads(client) -> None:
    md5 = base64.b64encode(hashlib.md5(DATA).digest()).decode()
    client.put_object(Bucket=BUCKET, Key="k", Body=DATA, ContentMD5=md5)
    client.upload_part(Bucket=BUCKET, Key="k", UploadId="u", PartNumber=1, Body=DATA, ContentMD5=md5)


@pytest.mark.parametrize("scheme,checksums,signed", [("http", "auto", False), ("http", "off", True),
                                                     ("https", "auto", False)])
def test_bodies_are_not_signed_with_their_sha256_when_content_md5_is_sent(
        aws_credentials, make_cfg, scheme, checksums, signed):
    """Over http botocore hashes every body for its SigV4 signature unless told not to: with
    Content-MD5 on every upload (S3_CHECKSUMS=auto) that pass over the bytes is left out, as
    botocore does over https by itself."""
    cfg = make_cfg(S3_ENDPOINT=f"{scheme}://127.0.0.1:9", S3_CHECKSUMS=checksums)
    seen = sent_sha256_headers(cfg, [part_uploads])
    assert seen == [hashlib.sha256(DATA).hexdigest() if signed else "UNSIGNED-PAYLOAD"] * 2


def test_https_keeps_botocores_rule_for_bodies_without_content_md5(aws_credentials, make_cfg):
    cfg = make_cfg(S3_ENDPOINT="https://127.0.0.1:9")
    seen = sent_sha256_headers(cfg, [lambda c: c.put_object(Bucket=BUCKET, Key="k", Body=DATA)])
    assert seen == [hashlib.sha256(DATA).hexdigest()]
