"""MemoryRecords: ``common_s3.Records`` on a dict instead of S3, for unit tests of what uses
only Records' public methods (Claims, S3Sink), as restic tests its retrying backend against
an in-memory one with the same interface. Each method of Records that reaches ``self.s3``
is overridden (``self.s3`` is None: one added later and not here fails at once); requests
still go through ``Records._call``, which counts them and types the ClientErrors raised here.

Enforced as on moto: If-None-Match: * (refused where an object is) and If-Match (refused when
the ETag differs, NoSuchKey where no object is) on PutObject and DeleteObject, If-None-Match
on CompleteMultipartUpload (a refusal keeps the upload); ETags (MD5 of a PUT, MD5 of the
chunk MD5s + ``-N`` of a multipart object); parts named by number and ETag; listings in key
order with common prefixes, a request per 1000 entries; also Content-MD5, as AWS (not moto)
checks it. ``enforce=False`` ignores every condition, as ``rclone serve s3`` does, and
``caps`` say so. Not modelled: the 5 MiB minimum part size, 409 conflicts (inject them with
``fail``), versions, ranges, metadata. LastModified and ``Fetched.age_s`` follow ``clock``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import threading
import time
import uuid
from typing import Any, Callable, ContextManager, Iterator, NamedTuple, Sequence

from botocore.exceptions import ClientError

from common_s3 import Capabilities, Config, Fetched, KeyMissing, MultipartUpload, Records


class Clock:
    """A clock that moves only when told (lease clocks, the store's clock)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Stored(NamedTuple):
    body: bytes
    etag: str  # unquoted
    last_modified: datetime.datetime
    content_type: str


def refusal(op: str, code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"memstore: {code}"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def digest(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


class MemoryUpload(MultipartUpload):
    """A multipart upload in the store; ``abort`` is MultipartUpload's (``abort_upload``)."""

    records: "MemoryRecords"

    def upload_part(self, number: int, body: Any, md5: bytes | None) -> str:
        data, r = bytes(body), self.records

        def part() -> str:
            r._check("UploadPart", self.key, {}, data, md5)
            if self.upload_id not in r.uploads:
                raise refusal("UploadPart", "NoSuchUpload", 404)
            r.uploads[self.upload_id][2][number] = data
            return f'"{digest(data).hex()}"'
        return r._op("UploadPart", self.key, part)

    def complete(self, parts: Sequence[dict], *, create_only: bool) -> str:
        op, r = "CompleteMultipartUpload", self.records

        def finish() -> str:
            if self.upload_id not in r.uploads:
                raise refusal(op, "NoSuchUpload", 404)
            _key, content_type, uploaded = r.uploads[self.upload_id]
            numbers = [p["PartNumber"] for p in parts]
            chunks = [uploaded.get(n, b"") for n in numbers]
            if not numbers or numbers != sorted(set(numbers)) or any(
                    n not in uploaded or digest(c).hex() != p["ETag"].strip('"')
                    for n, c, p in zip(numbers, chunks, parts)):
                raise refusal(op, "InvalidPart", 400)
            r._check(op, self.key, {"IfNoneMatch": "*"} if create_only else {})
            etag = digest(b"".join(digest(c) for c in chunks)).hex() + f"-{len(chunks)}"
            r.objects[self.key] = Stored(b"".join(chunks), etag, r.now(), content_type)
            del r.uploads[self.upload_id]
            return etag
        return r._op(op, self.key, finish, conditional=create_only)


class MemoryRecords(Records):
    """Records on an in-memory, thread-safe store; ``fail`` injects faults into its requests."""

    def __init__(self, cfg: Config, stop: threading.Event | None = None, enforce: bool = True, *,
                 clock: Callable[[], float] = time.time):
        super().__init__(None, cfg, stop=stop)
        self.enforce, self.clock, self.lock = enforce, clock, threading.RLock()
        self.objects: dict[str, Stored] = {}
        self.uploads: dict[str, tuple[str, str, dict[int, bytes]]] = {}  # id: (key, content type, parts)
        self.caps = Capabilities(create_only=enforce, compare_and_swap=enforce, send_conditions=True,
                                 md5_checked=True)
        self._faults: dict[str, list[tuple[BaseException, bool]]] = {}

    def twin(self, cfg: Config, stop: threading.Event | None = None) -> "MemoryRecords":
        """Another worker's Records on the same store: its own config, request count and faults."""
        other = MemoryRecords(cfg, stop if stop is not None else self.stop, self.enforce, clock=self.clock)
        other.objects, other.uploads, other.lock = self.objects, self.uploads, self.lock
        return other

    def fail(self, op: str, exc: BaseException, times: int = 1, *, landed: bool = False) -> None:
        """The next ``times`` requests ``op`` (e.g. "PutObject") raise ``exc``: before doing
        anything, or with ``landed`` after their effect (an answer lost on the way back)."""
        with self.lock:
            self._faults.setdefault(op, []).extend([(exc, landed)] * times)

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(int(self.clock()), datetime.timezone.utc)

    def _op(self, op: str, key: str | None, fn: Callable[[], Any], *, conditional: bool = False) -> Any:
        """One request through Records._call (counted, errors typed): ``fn`` runs under the
        store's lock, after or before a fault queued for ``op``."""
        def once() -> Any:
            with self.lock:
                exc, landed = self._faults[op].pop(0) if self._faults.get(op) else (None, False)
                if exc is not None and not landed:
                    raise exc
                result = fn()
            if exc is not None:
                raise exc
            return result
        return self._call(op, key, once, conditional=conditional)

    def _check(self, op: str, key: str, cond: dict[str, str], data: bytes = b"", md5: bytes | None = None) -> None:
        """Raise what the server answers to a wrong Content-MD5 or to a condition that does not hold."""
        if md5 is not None and md5 != digest(data):
            raise refusal(op, "BadDigest", 400)
        there = self.objects.get(key)
        if self.enforce and "IfNoneMatch" in cond and there is not None:
            raise refusal(op, "PreconditionFailed", 412)
        if self.enforce and "IfMatch" in cond:
            if there is None:
                raise refusal(op, "NoSuchKey", 404)
            if cond["IfMatch"].strip('"') != there.etag:
                raise refusal(op, "PreconditionFailed", 412)

    def _fetch(self, op: str, key: str) -> Stored:
        def read() -> Stored:
            if key not in self.objects:
                raise refusal(op, "404" if op == "HeadObject" else "NoSuchKey", 404)
            return self.objects[key]
        return self._op(op, key, read)

    def check_bucket(self) -> None:
        self._op("HeadBucket", None, lambda: None)

    def head(self, key: str) -> dict | None:
        try:
            s = self._fetch("HeadObject", key)
        except KeyMissing:
            return None
        return {"ContentLength": len(s.body), "ETag": f'"{s.etag}"', "LastModified": s.last_modified,
                "ContentType": s.content_type}

    def get(self, key: str) -> Fetched | None:
        def once() -> Fetched | None:
            try:
                s = self._fetch("GetObject", key)
            except KeyMissing:
                return None
            return Fetched(s.body, s.etag, s.last_modified, (self.now() - s.last_modified).total_seconds())
        return self.retry(f"GET {key}", once)

    def open(self, key: str) -> ContextManager[tuple[Any, str]]:
        s = self._fetch("GetObject", key)
        return contextlib.nullcontext((io.BytesIO(s.body), s.etag))

    def download(self, key: str, path: str) -> None:
        def once() -> None:
            body = self._fetch("GetObject", key).body
            with open(path, "wb") as fh:
                fh.write(body)
        self.retry(f"download of {key}", once)

    def list_keys(self, prefix: str, *, delimiter: str | None = None) -> Iterator[dict]:
        """As of its first page; a request per page of 1000 entries, as S3 answers."""
        entries = self._op("ListObjectsV2", prefix, lambda: self._entries(prefix, delimiter))
        for start in range(0, len(entries), 1000):
            if start:
                self.count()
            page = entries[start:start + 1000]
            yield from ({"Prefix": name} for name, s in page if s is None)
            yield from ({"Key": name, "Size": len(s.body), "LastModified": s.last_modified,
                         "ETag": f'"{s.etag}"', "StorageClass": "STANDARD"} for name, s in page if s is not None)

    def _entries(self, prefix: str, delimiter: str | None) -> list[tuple[str, Stored | None]]:
        """In key order: (key, Stored) of each object, (common prefix, None) of each group."""
        entries: dict[str, Stored | None] = {}
        for key, s in sorted((k, s) for k, s in self.objects.items() if k.startswith(prefix)):
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut < 0:
                entries[key] = s
            else:
                entries.setdefault(key[:cut + len(delimiter or "")], None)
        return list(entries.items())

    def put_bytes(self, key: str, body: Any, *, content_type: str = "application/octet-stream",
                  create_only: bool = False, md5: bytes | None = None, send_md5: bool | None = None,
                  **condition: str) -> str:
        self.refuse_writes_in_dry_run(f"write s3 key {key!r}")
        data = bytes(body)
        send = send_md5 if send_md5 is not None else self.cfg.s3_checksums != "off"
        cond = dict({"IfNoneMatch": "*"} if create_only and self.caps.create_only else {}, **condition)

        def put() -> str:
            self._check("PutObject", key, cond, data, (md5 or digest(data)) if send else None)
            self.objects[key] = Stored(data, digest(data).hex(), self.now(), content_type)
            return self.objects[key].etag
        return self._op("PutObject", key, put, conditional=bool(cond))

    def delete(self, key: str, **condition: str) -> None:
        self.refuse_writes_in_dry_run(f"delete s3 key {key!r}")

        def remove() -> None:
            self._check("DeleteObject", key, condition)
            self.objects.pop(key, None)
        self._op("DeleteObject", key, remove, conditional=bool(condition))

    def start_upload(self, key: str, content_type: str) -> MultipartUpload:
        self.refuse_writes_in_dry_run(f"upload s3 key {key!r}")
        upload_id = uuid.uuid4().hex
        self._op("CreateMultipartUpload", key, lambda: self.uploads.update({upload_id: (key, content_type, {})}))
        return MemoryUpload(self, key, upload_id)

    def abort_upload(self, key: str, upload_id: str) -> None:
        def abort() -> None:
            if self.uploads.get(upload_id, ("",))[0] != key:
                raise refusal("AbortMultipartUpload", "NoSuchUpload", 404)
            del self.uploads[upload_id]
        self._op("AbortMultipartUpload", key, abort)

    def list_uploads(self, prefix: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        uploads = self._op("ListMultipartUploads", prefix, lambda: list(self.uploads.items()))
        for upload_id, (key, _type, _parts) in uploads:
            if key.startswith(prefix):
                found.setdefault(key, []).append(upload_id)
        return found

    def probe(self, probe_prefix: str) -> Capabilities:
        """What the store enforces, known from the start: nothing is written."""
        return self.caps
