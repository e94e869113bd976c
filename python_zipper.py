"""python_zipper.py: bundle SOURCE's files into store-mode zip parts on S3, following the map.

For every part of the latest map that has no completion record yet, it downloads
exactly that part's files with rclone into a staging folder under WORK_DIR, checks
each against the map, and writes a store-mode zip straight into an S3 upload (no
local zip file), recording every entry's offset, size, CRC-32 and MD5. After the
upload is checked on S3 it writes the part's completion record. Files above the
large-file threshold are copied SOURCE to DESTINATION with rclone, checked and
recorded. A file that vanished or changed at SOURCE since mapping is reported by
path and left out; the rest proceeds and the exit code is 3.

Usage: python python_zipper.py [--help | --status [--html FILE]]

  --status   one table of the whole migration across all stages, read from S3 (no lock)
  --html FILE  with --status: also write it as one self-contained HTML page (README: Status page)

Example:
  SOURCE=onedrive:"Work Files" DESTINATION=gdrive:"Work Files" S3_BUCKET=my-hub \\
    S3_ENDPOINT=https://s3.wasabisys.com python python_zipper.py
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import queue
import re
import stat
import struct
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from common_s3 import (Config, ConfigError, count, DiskGate, EXIT_OK, EXIT_PARTIAL, EXIT_WAITING,
                       FolderEntry, format_mtime_ns, human_bytes, is_local_path, jsonl_gz_bytes, large_file_id,
                       LargeRecord, Layout, load_manifest, log_event, MapView, local_name, log_context, MIB, MigrationError,
                       MultipartUpload, out, parse_mtime, PartRecord, Passes, plain_local_name, plan_drift,
                       PlanRecord, Rclone, RcloneError, RecordExists, Records, remote_join, ROOT_LABEL, Run,
                       run_script, Runtime, S3Error, SERVER_MTIME, Skipped, staging_dir, start_run, StopRequested, Unit,
                       Upstream, utc_now, wait_for_map)

log = logging.getLogger("python_zipper")

SCRIPT = "zipper"
MIN_CHUNK = 16 * MIB  # x2 (one filling, one uploading) x MAX_PARALLEL_WORKERS: the zipper's buffers
MAX_S3_PARTS = 9000
# A file up to this size is read once, into memory (one buffer per part being zipped, as large
# as its largest such file), before its header; a larger one is read twice, CRC-32 first. Either
# way the local header holds the sizes and CRC-32: no data descriptor.
IN_MEMORY_MAX = 16 * MIB


# Pure planning

def chunk_size_for(estimated_bytes: int) -> int:
    """Multipart chunk size: at least 16 MiB, large enough that a part needs under 9,000 chunks
    (so one part of up to 16 MiB is a single PUT, and a part of tens of MiB a few chunks)."""
    need = -(-estimated_bytes // MAX_S3_PARTS)
    return max(MIN_CHUNK, -(-need // MIB) * MIB)


def zip_overhead(paths: Sequence[str]) -> int:
    """Bytes a store-mode zip adds around its entries (headers, descriptors, central directory)."""
    return sum(30 + 46 + 2 * (len(p.encode("utf-8")) + 9 + 20) + 24 for p in paths) + 22 + 56 + 20


def ut_extra(mtime_s: float) -> bytes:
    """The extended-timestamp extra field (0x5455) holding the Unix mtime, as Info-ZIP writes it."""
    value = max(-2**31, min(2**31 - 1, int(mtime_s)))
    return struct.pack("<HHBi", 0x5455, 5, 1, value)


def dos_time(mtime_s: float) -> tuple[int, int, int, int, int, int]:
    t = time.localtime(max(mtime_s, 315532800 + 86400))
    year = min(max(t.tm_year, 1980), 2107)
    return (year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def expected_etag(chunk_md5s: Sequence[bytes], *, multipart: bool | None = None) -> str:
    """The ETag S3 gives an object: its MD5 for a single PUT, MD5 of the chunk MD5s + -N for a
    multipart upload (also one of a single chunk)."""
    if multipart is None:
        multipart = len(chunk_md5s) > 1
    if not multipart:
        return chunk_md5s[0].hex()
    return hashlib.md5(b"".join(chunk_md5s)).hexdigest() + f"-{len(chunk_md5s)}"


def check_etag(key: str, got: str, multipart_etag: str, whole_md5: str | None, *,
               chunks_checked: bool = False) -> None:
    """The object's ETag after upload, against what was sent.

    Servers differ: AWS, MinIO and moto give a multipart object MD5-of-chunk-MD5s-N, while
    ``rclone serve s3`` gives the MD5 of the whole object. Either match passes. An MD5-shaped
    ETag that matches neither means the bytes differ: damage. An ETag that is not MD5-shaped
    (some services) cannot be checked here; the size was, and the unzipper checks SHA-256.
    """
    if got in (multipart_etag, whole_md5):
        return
    if whole_md5 is None and chunks_checked and re.fullmatch(r"[0-9a-f]{32}", got):
        log.debug("s3 key %r has the whole object's MD5 as ETag; each chunk's MD5 was checked by the "
                  "server on upload, and the size here", key)
        return
    if re.fullmatch(r"[0-9a-f]{32}(-\d+)?", got):
        if whole_md5 is None and "-" not in got:
            raise MigrationError(f"s3 key {key!r} has ETag {got}, the MD5 of a whole object, where this "
                                 f"server gave multipart ETags before ({multipart_etag} expected); the "
                                 "part was not checked and will be made again")
        raise MigrationError(f"s3 key {key!r} has ETag {got}, expected {multipart_etag} or {whole_md5}: "
                             "the upload was damaged")
    log.warning("s3 key %r has an ETag that is not an MD5 (%s): checked by size only here", key, got)


# Streaming a zip into S3

class ObjectExists(MigrationError):
    """A create-only write of a part object found an object at its key."""

    def __init__(self, key: str):
        super().__init__(f"s3 key {key!r} already holds an object")
        self.key = key


@dataclass(frozen=True)
class SinkOptions:
    """How an S3Sink sends: Content-MD5 with each chunk, uploader threads, whether it hashes the
    whole object's MD5 too, and whether the object may appear only where none is (fencing)."""

    send_md5: bool = True
    uploaders: int = 2
    whole_md5: bool = True
    create_only: bool = False


class S3Sink:
    """A write-only file for zipfile that streams into one S3 object.

    Bytes fill a chunk; the first full chunk starts a multipart upload, and background
    threads upload full chunks while the zip goes on, at most ``uploaders`` at a time. A
    full chunk is handed over as it is (never copied), so memory stays at
    ``chunk x (uploaders + 1)`` whatever the part's size. An object smaller than one chunk
    is sent with a single PUT. Every chunk carries a Content-MD5; the SHA-256 of the whole
    object is computed on the way, and its MD5 too, over the chunks as they are cut, unless
    ``whole_md5`` is False (servers whose multipart ETags are MD5-of-chunk-MD5s, or that check
    each chunk's Content-MD5, do not need it); a single PUT's MD5 is its chunk's.
    """

    def __init__(self, records: Records, key: str, chunk_bytes: int, runtime: Runtime,
                 options: SinkOptions | None = None):
        opts = options or SinkOptions()
        send_md5, uploaders, whole_md5, create_only = opts.send_md5, opts.uploaders, opts.whole_md5, opts.create_only
        self.records = records
        self.key = key
        self.chunk = chunk_bytes
        self.runtime = runtime
        self.send_md5 = send_md5
        self.buf = bytearray()
        self.total = 0
        self.sha256 = hashlib.sha256()
        self.md5: Any = hashlib.md5() if whole_md5 else None
        self.chunk_md5s: list[bytes] = []  # in chunk order, complete once finish() returns
        self.chunks = 0  # chunks cut so far
        self._md5_of: dict[int, bytes] = {}  # chunk number -> MD5, filled by the uploaders
        self.parts: list[dict] = []
        self.upload: MultipartUpload | None = None
        self.multipart = False
        self.etag: str | None = None
        self.uploaders = max(1, uploaders)
        self.create_only = create_only  # the object appears only where no object is (fencing)
        self._final: tuple[str, Any] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(self.uploaders)  # chunks queued or uploading
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # The file protocol zipfile needs
    def write(self, data: Any) -> int:
        if self._error:
            raise self._error
        self.runtime.check()
        n = len(data)
        self.total += n
        self.sha256.update(data)
        view = memoryview(data)
        while len(view):
            room = self.chunk - len(self.buf)
            self.buf += view[:room]
            view = view[room:]
            if len(self.buf) == self.chunk and len(view):
                body, self.buf = self.buf, bytearray()
                self._send(body)
        return n

    def tell(self) -> int:
        return self.total

    def seek(self, *_args: Any) -> int:
        raise OSError("S3Sink is not seekable")

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        return None

    # Upload machinery
    @property
    def upload_id(self) -> str | None:
        return self.upload.upload_id if self.upload is not None else None

    def _md5(self, number: int, body: Any) -> bytes | None:
        """The chunk's MD5, kept for the ETag check; returned when it is to be sent as Content-MD5."""
        digest = hashlib.md5(body).digest()
        with self._lock:
            self._md5_of[number] = digest
        return digest if self.send_md5 else None

    def _wait_slot(self) -> None:
        while not self._slots.acquire(timeout=0.5):
            if self._error:
                raise self._error
            self.runtime.check()
        if self._error:
            self._slots.release()
            raise self._error

    def _send(self, body: bytearray) -> None:
        if self.upload is None:
            self.upload = self.records.start_upload(self.key, "application/zip")
            self._threads = [threading.Thread(target=self._uploader, daemon=True, name=f"part-upload-{n}")
                             for n in range(self.uploaders)]
            for t in self._threads:
                t.start()
        self.chunks += 1
        if self.md5 is not None:  # chunks are cut in order; a single PUT needs no whole MD5 (its chunk's is it)
            self.md5.update(body)
        self._wait_slot()
        self._queue.put((self.chunks, body))  # its MD5 is computed by the uploader, beside the zip

    def _uploader(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            number, body = item
            del item
            try:
                if not self._error:
                    assert self.upload is not None
                    etag = self.upload.upload_part(number, body, self._md5(number, body))
                    with self._lock:
                        self.parts.append({"PartNumber": number, "ETag": etag})
            except BaseException as exc:  # handed to the writer thread, which raises it
                self._error = exc
            finally:
                del body
                self._slots.release()

    def _alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def finish(self) -> None:
        """Send what is left and complete the object; raise on any failure (ObjectExists when
        the object may appear only where none is, and one is there)."""
        if self._error:
            raise self._error
        if self.upload is None and len(self.buf) <= self.chunk:
            self.chunks = 1
            self._md5(1, self.buf)
            self.chunk_md5s = [self._md5_of[1]]
            self._final = ("put", self.buf)
            return self.commit()
        if self.buf:
            body, self.buf = self.buf, bytearray()
            self._send(body)
        self.multipart = True
        for _ in self._threads:
            self._queue.put(None)
        while self._alive():
            self.runtime.check()
            for t in self._threads:
                t.join(0.5)
        if self._error:
            raise self._error
        parts = sorted(self.parts, key=lambda p: p["PartNumber"])
        if [p["PartNumber"] for p in parts] != list(range(1, self.chunks + 1)):
            raise MigrationError(f"s3 key {self.key!r}: {len(parts)} chunks uploaded, {self.chunks} were cut")
        self.chunk_md5s = [self._md5_of[n] for n in range(1, self.chunks + 1)]
        self._final = ("complete", parts)
        return self.commit()

    def commit(self) -> None:
        """The request that makes the object appear (again after ObjectExists, once the key
        has been cleared). The unit's claim is confirmed first: a worker that lost it never
        publishes a part."""
        assert self._final is not None
        self.runtime.confirm_claim()
        kind, what = self._final
        try:
            if kind == "put":
                cond = {"IfNoneMatch": "*"} if self.create_only else {}
                self.etag = self.records.put_bytes(self.key, what, content_type="application/zip",
                                                   md5=self._md5_of[1], send_md5=self.send_md5, **cond)
            else:
                assert self.upload is not None
                self.etag = self.upload.complete(what, create_only=self.create_only)
                self.upload = None
        except RecordExists:
            raise ObjectExists(self.key) from None
        self._final = None

    def whole_md5(self) -> str | None:
        """MD5 of the whole object, when known (always for a single PUT)."""
        if not self.multipart:
            return self.chunk_md5s[0].hex() if self.chunk_md5s else None
        return self.md5.hexdigest() if self.md5 is not None else None

    def abort(self) -> None:
        if self.upload is not None:
            upload, self.upload = self.upload, None
            try:
                upload.abort()
            except S3Error as exc:
                log.warning("could not abort the multipart upload of %s (%s); the next attempt "
                            "at this part aborts it", self.key, exc)


def list_stale_uploads(records: Records, prefix: str) -> dict[str, list[str]]:
    """Unfinished multipart uploads under the prefix (left by killed runs): {key: [upload ids]}.
    Listed once per run; a part aborts only the uploads of its own key, when it starts."""
    return records.list_uploads(prefix)


def abort_uploads(records: Records, key: str, upload_ids: Sequence[str]) -> None:
    for upload_id in upload_ids:
        log.info("aborting an unfinished upload of %s left by an earlier run", key)
        try:
            records.abort_upload(key, upload_id)
        except S3Error as exc:
            log.warning("could not abort an old upload of %s: %s", key, exc)


# One part

@dataclass
class PartJob:
    folder: str
    stem: str
    part: str
    gen: int
    files: list[dict]
    bytes: int = 0
    skipped: list[dict] = field(default_factory=list)
    stale_uploads: list[str] = field(default_factory=list)
    # The map's mtimes are S3 LastModified (SERVER_MTIME): each file's own mtime is the staged
    # copy's, which rclone set from the object's metadata.
    server_mtime: bool = False


def local_source_dir(cfg: Config, folder: str) -> str | None:
    """SOURCE/<folder> as a directory to read directly when SOURCE is a plain local path, or
    None for an rclone remote (whose files rclone downloads into a staging folder)."""
    if not is_local_path(cfg.source):
        return None
    return os.path.join(cfg.source, folder) if folder else cfg.source


def split_local(files: Sequence[dict], base: str, precision_s: float = 1.0) -> tuple[dict[str, str], list[dict]]:
    """At a local SOURCE: ({path: file to read} for the files that are there as mapped, as
    plain files, and the rest). The rest goes through rclone, which knows its own name
    encoding and symlink rules, and is then checked and classified like any download."""
    where: dict[str, str] = {}
    other = []
    for f in files:
        full = os.path.join(base, f["path"])
        if not plain_local_name(f["path"]):
            other.append(f)
            continue
        try:
            st = os.lstat(full)
        except (OSError, ValueError):
            other.append(f)
            continue
        if (not stat.S_ISREG(st.st_mode) or st.st_size != f["size"]
                or (f["mtime"] and abs(st.st_mtime - parse_mtime(f["mtime"])) > precision_s)):
            other.append(f)
            continue
        where[f["path"]] = full
    return where, other


def stage_files(cfg: Config, rclone: Rclone, job: PartJob, files: Sequence[dict], staging: str,
                list_path: str) -> None:
    """Download exactly these files of the part into ``staging`` (NUL-separated list: any name works).

    rclone lists the directories that hold them instead of looking each file up (no
    ``--no-traverse``): one request per directory at SOURCE, not one per file."""
    source = remote_join(cfg.source, job.folder) if job.folder else cfg.source
    with open(list_path, "wb") as fh:
        fh.write(b"\0".join(f["path"].encode("utf-8", "surrogateescape") for f in files))
    timeout = cfg.rclone_timeout_s + sum(f["size"] for f in files) / (512 * 1024)
    rclone.run_retried(["copy", "--files-from0", list_path, "--transfers", str(cfg.download_threads),
                        "--no-check-dest", "--", source, staging],
                       what=f"download of part {job.part} of {job.folder or ROOT_LABEL}", timeout_s=timeout)


def check_staged(files: Sequence[dict], staging: str, precision_s: float = 1.0, *,
                 server_mtime: bool = False) -> list[dict]:
    """Files whose staged copy is missing or differs from the map (size, or mtime beyond 1 s).

    With ``server_mtime`` the map holds S3's LastModified, which says nothing of the staged
    copy's mtime: instead of the mtime, the MD5 the listing gave (the object's ETag) must be
    the staged bytes' own, so a file changed at SOURCE since mapping is still told apart."""
    bad = []
    for f in files:
        path = os.path.join(staging, f["path"])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            bad.append({"path": f["path"], "reason": "missing"})
            continue
        if st.st_size != f["size"]:
            bad.append({"path": f["path"], "reason": f"size {st.st_size} != mapped {f['size']}"})
        elif server_mtime:
            mapped = (f.get("hashes") or {}).get("md5")
            if mapped and file_md5(path) != mapped.lower():
                bad.append({"path": f["path"], "reason": "MD5 differs from the map"})
        elif f["mtime"] and abs(st.st_mtime - parse_mtime(f["mtime"])) > precision_s:
            bad.append({"path": f["path"], "reason": "modification time differs from the map"})
    return bad


def file_md5(path: str) -> str:
    md5 = hashlib.md5()
    block = bytearray(MIB)
    with open(path, "rb", buffering=0) as fh:
        while k := fh.readinto(block):
            md5.update(memoryview(block)[:k])
    return md5.hexdigest()


def classify_missing(cfg: Config, rclone: Rclone, job: PartJob, bad: list[dict], tmp: str,
                     failure: RcloneError | None = None) -> list[dict]:
    """Ask SOURCE again about files that did not stage: gone or changed (skip them, report by path)
    versus still there as mapped. Those failed to download: after rclone's own retries and ours
    (``failure``), each is left out as unreadable with rclone's words, so that it does not hold
    back the rest of its part on every run; without such a failure the part fails and is retried."""
    source = remote_join(cfg.source, job.folder) if job.folder else cfg.source
    list_path = os.path.join(tmp, local_name(job.stem, job.part, "recheck"))
    with open(list_path, "wb") as fh:
        fh.write(b"\0".join(b["path"].encode("utf-8", "surrogateescape") for b in bad))
    try:
        flags = ["--files-from0", list_path, "-R", "--files-only", "--no-mimetype"]
        if job.server_mtime:  # the map's kind of time, to compare with it
            flags.append("--use-server-modtime")
        now = {e["Path"]: e for e in rclone.lsjson(source, flags, what=f"re-listing of {len(bad)} files")}
    finally:
        os.remove(list_path)
    mapped = {f["path"]: f for f in job.files}
    skipped, transient = [], []
    for b in bad:
        entry, want = now.get(b["path"]), mapped[b["path"]]
        if entry is None:
            skipped.append({"path": b["path"], "reason": "deleted at SOURCE since mapping"})
        elif int(entry.get("Size", -1)) != want["size"] or (
                want["mtime"] and abs(parse_mtime(entry["ModTime"]) - parse_mtime(want["mtime"])) > 1):
            skipped.append({"path": b["path"], "reason": "changed at SOURCE since mapping"})
        else:
            transient.append(b["path"])
    if transient and failure is None:
        raise MigrationError(f"{len(transient)} files of part {job.part} are still at SOURCE as mapped "
                             f"but did not download (first: {transient[0]!r}); the part will be retried")
    for path in transient:
        words = rclone_words(failure.stderr_tail, path) if failure is not None else ""
        skipped.append({"path": path, "unreadable": True,
                        "reason": f"could not be read at SOURCE after retries: {words}"
                                  + unreadable_hint(cfg, path, words)})
    return skipped


def rclone_words(stderr_tail: str, path: str) -> str:
    """rclone's error line about ``path`` (its last one), without the timestamp, else its last error."""
    lines = [line for line in stderr_tail.splitlines() if "ERROR" in line or "Failed" in line]
    about = [line for line in lines if f" {path}: " in line or f"/{path}: " in line]
    line = (about or lines or [""])[-1]
    return line.split("ERROR : ", 1)[-1].strip()[:300]


def unreadable_hint(cfg: Config, path: str, words: str) -> str:
    """The rclone setting that reads such a name, where one is known."""
    name = path.rpartition("/")[2]
    backend = (cfg.source or "").partition(":")[0]
    if (name != name.rstrip(" ") or name != name.lstrip(" ")) and ("550" in words or "ftp" in backend.lower()):
        return ("; on FTP a name ending (or starting) in a space needs the remote's `encoding` without "
                "RightSpace/LeftSpace (rclone's default is Slash,Del,Ctl,RightSpace,Dot; e.g. "
                f"RCLONE_CONFIG_{backend.upper().lstrip(':')}_ENCODING=Slash,Del,Ctl,Dot)")
    return ""


def _read_full(src: Any, view: memoryview) -> int:
    """Fill ``view`` from the raw file ``src`` (a read may come short); the bytes read, fewer
    than asked only at the file's end."""
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def write_stored(zf: zipfile.ZipFile, info: zipfile.ZipInfo, crc: int, size: int,
                 pieces: Iterable[Any]) -> None:
    """Add one store-mode entry whose local header holds its CRC-32 and sizes (flag bit 3 clear,
    no data descriptor); ``pieces`` are its bytes, exactly ``size`` of them.

    zipfile itself computes the CRC while it writes an entry, and on a stream that cannot seek
    back (S3Sink) puts it in a data descriptor after the data, which Java's ZipInputStream
    refuses for stored entries. Here the CRC is known first: the local header is the ZipInfo's
    own ``FileHeader`` (with the ZIP64 extra field holding the sizes beyond
    ``zipfile.ZIP64_LIMIT``, the rule zipfile's central directory follows), and the entry joins
    ``zf.filelist``, so that on close zipfile writes the central directory and the ZIP64 end
    records from the same ZipInfo, as for any entry of its own. These are the steps of
    zipfile's own ``ZipFile.mkdir`` (Python 3.11 to 3.13), with data after the header.
    """
    info.compress_type = zipfile.ZIP_STORED
    info.flag_bits = 0  # (zipfile adds the UTF-8 name flag where the name needs it)
    info.CRC = crc
    info.file_size = info.compress_size = size
    info.header_offset = zf.fp.tell()
    zf.fp.write(info.FileHeader(zip64=size > zipfile.ZIP64_LIMIT))
    sent = 0
    for piece in pieces:
        zf.fp.write(piece)
        sent += len(piece)
    if sent != size:
        raise MigrationError(f"{info.filename!r}: {sent} bytes written after a header that says {size}")
    zf.filelist.append(info)
    zf.NameToInfo[info.filename] = info
    zf.start_dir = zf.fp.tell()  # where the central directory goes, as zipfile's own writers keep it


@dataclass
class ReadBuffers:
    """A part's read buffers: ``whole`` holds a file of up to IN_MEMORY_MAX bytes (and one more, so
    a file that grew is seen; None for a larger file), ``block`` is the piece a larger file is
    read in, twice."""

    whole: memoryview | None
    block: memoryview


def write_zip(sink: S3Sink, job: PartJob, where: str | dict[str, str], skip: set[str],
              runtime: Runtime) -> list[dict]:
    """Stream the part's files into a store-mode zip; return the entries (offset, size, CRC, MD5).

    ``where`` is the folder holding every file, or {path: file to read} for each one (read in
    place at a local SOURCE). Each local header holds its entry's CRC-32 and sizes, and no entry
    has a data descriptor, so streaming readers (Java's ZipInputStream) read every entry: a file
    up to IN_MEMORY_MAX is read once into memory before its header, a larger one twice, in MiB
    blocks (its CRC-32 first; then the bytes sent, whose CRC-32 must be that one again).
    """
    entries = []
    bound = IN_MEMORY_MAX
    kept = [f for f in job.files if f["path"] not in skip]
    # One buffer for the part's small files, as large as the largest of them (one byte more: a
    # file that grew is seen), so memory stays at most IN_MEMORY_MAX + 1 MiB per part.
    buffers = ReadBuffers(whole=memoryview(bytearray(max([f["size"] for f in kept if f["size"] <= bound],
                                                         default=0) + 1)),
                          block=memoryview(bytearray(MIB)))
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in kept:
            runtime.check()
            in_place = not isinstance(where, str)
            full = where[f["path"]] if in_place else os.path.join(where, f["path"])
            # The entry's mtime is the file's own: the map's, or with SERVER_MTIME the staged copy's.
            real = format_mtime_ns(os.stat(full).st_mtime_ns) if job.server_mtime else f["mtime"]
            mtime = parse_mtime(real) if real else os.stat(full).st_mtime
            info = zipfile.ZipInfo(f["path"], date_time=dos_time(mtime))
            info.external_attr = (0o100644 << 16)
            info.extra = ut_extra(mtime)
            with open(full, "rb", buffering=0) as src:
                crc, md5 = write_file(zf, info, src, {**f, "mtime": real}, in_place=in_place, runtime=runtime,
                                      buffers=buffers if f["size"] <= bound else ReadBuffers(None, buffers.block))
            entries.append({"path": f["path"], "offset": info.header_offset, "size": f["size"],
                            "crc32": f"{crc:08x}", "md5": md5, "mtime": real})
    return entries


def write_file(zf: zipfile.ZipFile, info: zipfile.ZipInfo, src: Any, f: dict, *, in_place: bool,
               buffers: ReadBuffers, runtime: Runtime) -> tuple[int, str]:
    """Write the open file ``src`` (map row ``f``) as the entry ``info``; return the CRC-32 and
    MD5 of the bytes written, which are exactly the mapped size.

    With ``buffers.whole`` (of at least size + 1 bytes) the file is read once, into it. Without,
    it is read twice in ``buffers.block``-sized pieces: the CRC-32 for the header, then the bytes sent,
    whose CRC-32 must be that one again, so the header always describes the bytes after it.
    A file read in place at SOURCE (``in_place``) must also still have its mapped size and
    mtime once read.
    """
    path, size = f["path"], f["size"]
    buffer, block = buffers.whole, buffers.block

    def changed(why: str) -> MigrationError:
        if in_place:
            return MigrationError(f"{path!r} changed at SOURCE while it was zipped ({why}); the part is "
                                  "not published (a rerun leaves the file out and reports it; the next "
                                  "FORCE_RESCAN=1 pass takes its new bytes)")
        return MigrationError(f"{path!r} changed while it was zipped ({why})")

    def check_unchanged() -> None:
        if in_place:
            st = os.fstat(src.fileno())
            if st.st_size != size or (f["mtime"] and abs(st.st_mtime - parse_mtime(f["mtime"])) > 1.0):
                raise changed("its size or modification time is no longer the mapped one")

    md5 = hashlib.md5()
    if buffer is not None:
        n = _read_full(src, buffer[:size + 1])
        if n != size:
            raise changed(f"{'more than ' if n > size else ''}{min(n, size)} bytes, mapped {size}")
        check_unchanged()
        data = buffer[:size]
        md5.update(data)
        crc = zlib.crc32(data)
        write_stored(zf, info, crc, size, [data])
        return crc, md5.hexdigest()

    crc = n = 0
    while k := src.readinto(block):
        runtime.check()
        crc = zlib.crc32(block[:k], crc)
        n += k
    if n != size:
        raise changed(f"{n} bytes, mapped {size}")
    src.seek(0)

    def second_read() -> Iterator[memoryview]:
        again = sent = 0
        while k := src.readinto(block):
            again = zlib.crc32(block[:k], again)
            md5.update(block[:k])
            sent += k
            if sent > size:
                break
            yield block[:k]
        if sent != size or again != crc:
            raise changed(f"{sent} bytes with CRC-32 {again:08x} on the second read, "
                          f"{size} with {crc:08x} on the first")

    write_stored(zf, info, crc, size, second_read())
    check_unchanged()
    return crc, md5.hexdigest()


class EtagStyle:
    """What this server's multipart ETags look like, learnt from the first multipart part.

    Until a multipart ETag of the MD5-of-chunk-MD5s form has been seen, every sink also
    hashes its whole object (one more MD5 pass) to check servers that give the whole
    object's MD5 instead, like ``rclone serve s3``.
    """

    def __init__(self) -> None:
        self.chunked = False

    def learn(self, sink: S3Sink, got: str) -> None:
        if sink.multipart and got == expected_etag(sink.chunk_md5s, multipart=True):
            self.chunked = True


def zip_part(ctx: Run, job: PartJob, etags: EtagStyle | None = None) -> PartRecord:
    """Make one part: read (or stage) its files, check them, stream the zip to S3, verify it,
    record it."""
    cfg, runtime = ctx.cfg, ctx.runtime
    staging = os.path.join(cfg.tmp_dir, local_name(job.stem, job.part))
    list_path = staging + ".files"
    what = f"part {job.part} of {job.folder or ROOT_LABEL}"
    etags = etags or EtagStyle()
    base = local_source_dir(cfg, job.folder)
    where, fetch = split_local(job.files, base) if base is not None else ({}, list(job.files))
    fetch_bytes = sum(f["size"] for f in fetch)
    gate = ctx.gate if ctx.gate is not None else DiskGate(cfg, runtime)
    with runtime.progress.unit(f"{job.folder or ROOT_LABEL}/{job.part}", job.folder, job.bytes), \
            log_context(folder=job.folder, part=job.part), \
            (gate.reserve(int(fetch_bytes * 1.05) + MIB, what) if fetch else contextlib.nullcontext()), \
            staging_dir(staging, what):
        started = time.monotonic()
        sink = None
        try:
            if fetch:
                if base is not None:
                    log.info("%d of %d files are not plain files as mapped at the local SOURCE; "
                             "rclone fetches them (first: %r)", len(fetch), len(job.files), fetch[0]["path"])
                job.skipped = fetch_files(ctx, job, fetch, staging, list_path)
                where.update((f["path"], os.path.join(staging, f["path"])) for f in fetch)
            staged_at = time.monotonic()
            sink, entries = stream_part(ctx, job, where, etags)
            if sink is None:  # recorded by another worker meanwhile
                return entries
            record = publish_part(ctx, job, sink, entries, etags)
            log_event(log, logging.INFO, "part_uploaded",
                      {"files": len(entries), "bytes": sink.total, "seconds": round(time.monotonic() - started, 3),
                       "downloaded_files": len(fetch)},
                      "part uploaded: %s, %s in %.1fs (%s %.1fs, zip+upload %.1fs)",
                      count(len(entries), "file"), human_bytes(sink.total), time.monotonic() - started,
                     f"download of {count(len(fetch), 'file')}" if fetch else "nothing to download",
                     staged_at - started, time.monotonic() - staged_at)
            return record
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        finally:
            if os.path.exists(list_path):
                os.remove(list_path)


def fetch_files(ctx: Run, job: PartJob, fetch: list[dict], staging: str, list_path: str) -> list[dict]:
    """Stage the files rclone must fetch and check them against the map; return the files
    left out (gone or changed at SOURCE, or unreadable there after every retry)."""
    failure = None
    try:
        stage_files(ctx.cfg, ctx.rclone, job, fetch, staging, list_path)
    except RcloneError as exc:
        if exc.timed_out or exc.quota or exc.disk_full:
            raise
        failure = exc  # some files may have failed only: the check below tells
    bad = check_staged(fetch, staging, server_mtime=job.server_mtime)
    if failure is not None and not bad:
        raise failure  # every file arrived, yet rclone failed: not a file's trouble
    if not bad:
        return []
    skipped = classify_missing(ctx.cfg, ctx.rclone, job, bad, ctx.cfg.tmp_dir, failure)
    for s in skipped:
        log.error("left out of the part: %r: %s", s["path"], s["reason"])
    return skipped


def stream_part(ctx: Run, job: PartJob, where: dict[str, str], etags: EtagStyle) -> tuple[S3Sink | None, Any]:
    """The zip of the part's kept files, streamed into its object and published create-only:
    (the sink, the entries); or (None, the record) when another worker recorded the part first."""
    cfg, records = ctx.cfg, ctx.records
    key = ctx.layout.part_object(job.stem, job.part)
    skip = {s["path"] for s in job.skipped}
    kept = [f for f in job.files if f["path"] not in skip]
    abort_uploads(records, key, job.stale_uploads)
    estimate = sum(f["size"] for f in kept) + zip_overhead([f["path"] for f in kept])
    send_md5 = cfg.s3_checksums != "off"
    # The whole object's MD5 is one more pass over the bytes, needed only to check a server
    # that gives it as a multipart ETag without checking each chunk's MD5.
    chunks_checked = send_md5 and records.caps.md5_checked
    sink = S3Sink(records, key, chunk_size_for(estimate), ctx.runtime,
                  SinkOptions(send_md5=send_md5, uploaders=1, whole_md5=not (etags.chunked or chunks_checked),
                              create_only=records.caps.create_only))
    entries = write_zip(sink, job, where, skip, ctx.runtime)
    try:
        sink.finish()
    except ObjectExists:
        recorded = clear_unrecorded(records, ctx.layout, ctx.runtime, job, sink)
        if recorded is not None:
            sink.abort()
            return None, recorded
    return sink, entries


def publish_part(ctx: Run, job: PartJob, sink: S3Sink, entries: list[dict], etags: EtagStyle) -> PartRecord:
    """Check the object on S3 (size, ETag), then write its entries, its left-out marker and,
    last, its completion record, each after confirming the unit's claim."""
    cfg, records, layout, runtime = ctx.cfg, ctx.records, ctx.layout, ctx.runtime
    key = sink.key
    head = records.head(key)
    if head is None or head["ContentLength"] != sink.total:
        raise MigrationError(f"s3 key {key!r} has {head and head['ContentLength']} bytes after "
                             f"upload, {sink.total} were sent")
    got = head.get("ETag", "").strip('"')
    check_etag(key, got, expected_etag(sink.chunk_md5s, multipart=sink.multipart), sink.whole_md5(),
               chunks_checked=cfg.s3_checksums != "off" and records.caps.md5_checked)
    etags.learn(sink, got)
    entries_body = jsonl_gz_bytes(entries)
    entries_sha256 = hashlib.sha256(entries_body).hexdigest()
    entries_key = layout.part_entries(job.stem, job.part, entries_sha256)
    runtime.confirm_claim()
    records.put_bytes(entries_key, entries_body, content_type="application/gzip")
    record = PartRecord(key=key, size=sink.total, sha256=sink.sha256.hexdigest(), entries_key=entries_key,
                        etag=got, entries_sha256=entries_sha256, folder=job.folder, stem=job.stem, part=job.part,
                        generation=job.gen, files=len(entries), bytes=sum(e["size"] for e in entries),
                        skipped=job.skipped, created_at=utc_now(), worker=cfg.worker_id)
    unreadable = [sk for sk in job.skipped if sk.get("unreadable")]
    if unreadable:  # before the record: a mapper's FORCE_RESCAN=1 pass packs them again
        runtime.confirm_claim()
        records.put_json(layout.left_out(job.stem, job.part),
                         {"folder": job.folder, "part": job.part, "generation": job.gen,
                          "files": unreadable, "at": utc_now(), "worker": cfg.worker_id})
    runtime.confirm_claim()
    if not records.put_json_once(layout.part_record(job.stem, job.part), record.to_json()):
        log.warning("part %s was recorded by another worker meanwhile; its record is kept", job.part)
    return record


def clear_unrecorded(records: Records, layout: Layout, runtime: Runtime, job: PartJob,
                     sink: S3Sink) -> PartRecord | None:
    """The part's key already holds an object, so ours was not published (create-only).

    Recorded by another worker meanwhile: its record stands and is returned. The very bytes
    we made (an earlier attempt of ours, killed before its record): kept, and None. Anything
    else has no record, so nobody trusts it: it is deleted (only if it is still that object)
    and ours published in its place. Only the holder of the unit's claim gets here.
    """
    key = sink.key
    runtime.confirm_claim()
    rkey = layout.part_record(job.stem, job.part)
    found = records.get_json(rkey)
    if found is not None:
        record = PartRecord.from_json(rkey, found)
        log.warning("part %s was published and recorded by another worker meanwhile; its record is kept",
                    job.part)
        return record
    head = records.head(key)
    ours = expected_etag(sink.chunk_md5s, multipart=sink.multipart)
    if head is not None and head["ContentLength"] == sink.total and head.get("ETag", "").strip('"') == ours:
        log.info("the object of part %s is already there with these very bytes (an earlier attempt)", job.part)
        sink.etag = ours
        sink.upload = None  # completed by that attempt: nothing is left to abort
        return None
    log.warning("part %s: replacing an object without a record at %s, left by an earlier attempt",
                job.part, key)
    if head is not None:
        try:
            records.delete(key, IfMatch=head["ETag"])
        except RecordExists:
            raise MigrationError(f"s3 key {key!r} changed while it was being cleared; another worker "
                                 "writes this part") from None
    sink.commit()
    return None


# Large files

def copy_large(ctx: Run, folder: str, stem: str, row: dict, server_mtime: bool = False) -> LargeRecord:
    """rclone copyto SOURCE -> DESTINATION, then prove the copy: a hash kind both ends offer,
    else both files read back and their MD5s compared. The record keeps the file's own mtime:
    the map's, or with ``server_mtime`` (the map holds S3's LastModified) SOURCE's as one
    ``lsjson --stat`` gives it before the copy (a change since then fails the hash check, or
    leaves DESTINATION a time that its verification finds differing).

    The copy always transfers (``--ignore-times``): a large file is copied only when no record
    says it was, so whatever DESTINATION holds under that name is not known to be it, and
    DESTINATION without hashes or settable mtimes would let rclone skip a changed file of the
    same size. Size alone is never taken as proof."""
    cfg, records, layout, rclone, runtime = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime
    rel = row["path"]
    src = remote_join(cfg.source, folder, rel) if folder else remote_join(cfg.source, rel)
    dst = remote_join(cfg.destination, folder, rel) if folder else remote_join(cfg.destination, rel)
    timeout = cfg.rclone_timeout_s + row["size"] / (512 * 1024)
    with runtime.progress.unit(f"{folder or ROOT_LABEL}/large {rel}", folder, row["size"]), \
            log_context(folder=folder, part="large"):
        started = time.monotonic()
        log.info("copying large file %r (%s) SOURCE -> DESTINATION", rel, human_bytes(row["size"]))
        real = row["mtime"]
        if server_mtime:
            found = rclone.stat(src, what=f"mtime of large file {rel!r} at SOURCE")
            if not found or int(found.get("Size", -1)) != row["size"] or not found.get("ModTime"):
                raise MigrationError(f"large file {rel!r} is not at SOURCE as mapped (now: "
                                     f"{found and found.get('Size')} bytes, mapped {row['size']}); "
                                     "FORCE_RESCAN=1 on the mapper takes its new version")
            real = found["ModTime"]
        rclone.run_retried(["copyto", "--ignore-times", "--", src, dst], what=f"copy of large file {rel!r}",
                           timeout_s=timeout)
        kinds = sorted(k for k, v in row["hashes"].items() if v)
        flags = [f for k in kinds for f in ("--hash", "--hash-type", k)]
        stat = rclone.stat(dst, flags, what=f"check of {rel!r} at DESTINATION")
        if not stat or int(stat.get("Size", -1)) != row["size"]:
            raise MigrationError(f"large file {rel!r} at DESTINATION has size "
                                 f"{stat.get('Size') if stat else 'none'}, mapped {row['size']}")
        dest_hashes = stat.get("Hashes") or {}
        matched = [k for k in kinds if dest_hashes.get(k)]
        for kind in matched:
            if dest_hashes[kind] != row["hashes"][kind]:
                raise MigrationError(f"large file {rel!r} at DESTINATION has {kind} {dest_hashes[kind]}, "
                                     f"mapped {row['hashes'][kind]}")
        md5 = row["hashes"].get("md5") or None
        if matched:
            checked_by = matched[0]
        else:
            md5 = read_back_md5(rclone, src, dst, rel, timeout)
            checked_by = "download"
        file_id = large_file_id(rel, row["size"], row["mtime"])
        record = LargeRecord(path=rel, size=row["size"], id=file_id, folder=folder, stem=stem, mtime=real,
                             md5=md5, checked_by=checked_by, created_at=utc_now(), worker=cfg.worker_id)
        runtime.confirm_claim()
        records.put_json_once(layout.large_record(stem, file_id), record.to_json())
        log.info("large file %r copied and checked (%s) in %.1fs", rel,
                 "both ends read back, MD5 equal" if checked_by == "download" else checked_by,
                 time.monotonic() - started)
        return record


def read_back_md5(rclone: Rclone, src: str, dst: str, rel: str, timeout_s: float) -> str:
    """MD5 of the large file read back at both ends (no hash kind is shared): equal, or the copy failed."""
    name = rel.rpartition("/")[2]
    a = rclone.md5_by_download(src, what=f"read-back of {rel!r} at SOURCE", timeout_s=timeout_s).get(name)
    b = rclone.md5_by_download(dst, what=f"read-back of {rel!r} at DESTINATION", timeout_s=timeout_s).get(name)
    if not a or not b:
        raise MigrationError(f"large file {rel!r} could not be read back (SOURCE md5 {a}, DESTINATION md5 {b})")
    if a != b:
        raise MigrationError(f"large file {rel!r} differs after its copy: SOURCE md5 {a}, DESTINATION md5 {b}")
    return a


# The run

class Zipping:
    """The zipper's units of one map generation, planned afresh for each pass from a fresh
    listing of the part and large-file records (the first pass uses the listing made at start).
    A folder's manifest is loaded only when the plan reaches it. While the mapper still maps the
    generation (``MapView`` unfinished), each pass also takes the folders mapped since."""

    def __init__(self, ctx: Run, view: MapView, failed: set):
        self.ctx, self.view, self.gen, self.failed = ctx, view, view.gen, failed
        self.folders: list[FolderEntry] = []
        self.etags = EtagStyle()
        self.stale: dict[str, list[str]] = {}
        self.problems: list[tuple[str, str]] = []  # folders whose manifest could not be read
        self.counted: dict[str, tuple[int, int, int]] = {}  # stem -> units to do, their bytes, parts done
        self._fresh = False
        self.refresh()

    def refresh(self) -> None:
        records, layout = self.ctx.records, self.ctx.layout
        self.done_parts = records.record_names(layout.parts_root)
        self.done_large = records.record_names(layout.large_root)
        self.view.refresh()
        self.folders = [f for f in self.view.folders if self.ctx.in_shard(f.name)]
        self._fresh = True
        new = [f for f in self.folders if f.stem not in self.counted]
        for folder in new:
            self.counted[folder.stem] = self._count(folder)
        if new:
            units, nbytes, skipped = (sum(c[i] for c in self.counted.values()) for i in range(3))
            self.ctx.runtime.progress.plan(units, nbytes, skipped=skipped)

    def _count(self, folder: FolderEntry) -> tuple[int, int, int]:
        """What a folder adds to the progress display when it is first planned: its parts still
        to make and its large files still to copy (as far as the index tells), their bytes, and
        its parts already made."""
        todo = set(self.parts_to_make(folder))
        copied = len(self.done_large.get(folder.stem, set()))
        large_left = max(0, folder.large - copied)
        nbytes = sum(p["bytes"] for p in folder.part_table or [] if p["name"] in todo)
        return (len(todo) + large_left, nbytes + (folder.large_bytes if large_left else 0),
                len(folder.part_table or []) - len(todo))

    def parts_to_make(self, folder: FolderEntry) -> list[str]:
        return [p["name"] for p in folder.part_table or []
                if p["name"] not in self.done_parts.get(folder.stem, set())]

    def units(self) -> Iterator[Unit]:
        if not self._fresh:
            self.refresh()
        self._fresh = False
        self.problems = []
        for folder in self.folders:
            missing = [p for p in self.parts_to_make(folder) if (SCRIPT, folder.stem, p) not in self.failed]
            if missing or folder.large:
                yield from self._folder_units(folder, missing)

    def _folder_units(self, folder: FolderEntry, missing: list[str]) -> Iterator[Unit]:
        ctx, name, stem, gen = self.ctx, folder.name, folder.stem, self.gen
        index_path = os.path.join(ctx.cfg.tmp_dir, local_name(stem, f"g{gen}", "sqlite"))
        try:
            _header, index = load_manifest(ctx.records, ctx.layout.manifest(gen, stem), index_path)
        except Exception as exc:
            self.problems.append((f"folder {name!r}", str(exc)))
            log.error("folder %r: %s", name, exc)
            return
        server_mtime = index.mtime_kind == SERVER_MTIME
        try:
            for row in index.rows("l"):
                file_id = large_file_id(row["path"], row["size"], row["mtime"])
                unit = f"large-{file_id}"
                if file_id in self.done_large.get(stem, set()) or (SCRIPT, stem, unit) in self.failed:
                    continue
                yield Unit(SCRIPT, "large", name, stem, unit, f"large file {row['path']!r} of folder {name!r}",
                           functools.partial(copy_large, ctx, name, stem, row, server_mtime),
                           (ctx.layout.large_record(stem, file_id),))
            for part in missing:
                files = list(index.rows("f", part))
                job = PartJob(folder=name, stem=stem, part=part, gen=gen, files=files,
                              bytes=sum(f["size"] for f in files), server_mtime=server_mtime,
                              stale_uploads=self.stale.get(ctx.layout.part_object(stem, part), []))
                yield Unit(SCRIPT, "part", name, stem, part, f"part {part!r} of folder {name!r}",
                           functools.partial(zip_part, ctx, job, self.etags), (ctx.layout.part_record(stem, part),))
        finally:
            index.close()


def write_legacy_progress(records: Records, layout: Layout, folder: FolderEntry, done: set[str]) -> None:
    """The original ``_progress/<stem>_progress.json`` for a folder whose parts are all uploaded.

    Informational, for people and tools that read the original layout; no decision here
    is ever taken from it.
    """
    parts = [p["name"] for p in folder.part_table or []]
    if not folder.name or any(p not in done for p in parts):
        return
    records.put_json(layout.legacy_progress(folder.stem, "zipper"), {
        "completed_keys": [layout.part_object(folder.stem, p) for p in parts],
        "folder_complete": True, "updated_at": utc_now()})


def check_against_map(ctx: Run, gen: int, source: str | None) -> None:
    """SOURCE must be the one mapped (exit 2 if not); planning variables changed since are
    warned of; a remote DESTINATION that is not configured is exit 2 now, not 3 per file."""
    cfg = ctx.cfg
    if source != cfg.source:
        raise ConfigError(f"SOURCE={cfg.source!r} differs from the map's source {source!r}; "
                          "the zipper must read the SOURCE that was mapped")
    plan = ctx.records.get_json(ctx.layout.plan(gen))
    for line in plan_drift(cfg.environ, PlanRecord.from_json(ctx.layout.plan(gen), plan) if plan is not None else None):
        log.warning("%s", line)
    if not is_local_path(cfg.destination):
        ctx.rclone.features(cfg.destination, "DESTINATION")


def announce(ctx: Run, work: Zipping) -> int:
    """Log what this run has to do (the progress display is planned by ``Zipping``); the number
    of parts to make."""
    folders, view = work.folders, work.view
    if ctx.mode == "shards":
        log.info("static shard %d of %d: %d of the %d folders", ctx.cfg.worker_index, ctx.cfg.worker_count,
                 len(folders), len(view.folders))
    total_parts = sum(len(f.part_table or []) for f in folders)
    todo_parts = sum(len(work.parts_to_make(f)) for f in folders)
    so_far = "" if view.complete else f" mapped so far (the mapper is still mapping; {len(view.plan.folders)} planned)"
    log.info("map generation %d: %d folders%s, %d parts (%d to make), %d large files",
             work.gen, len(folders), so_far, total_parts, todo_parts, view.total("large"))
    return todo_parts


def print_plan(ctx: Run, work: Zipping) -> None:
    """DRY_RUN: every part still to make and every folder's large files, to stdout."""
    out.info(f"plan for map generation {work.gen} (DRY_RUN: nothing is downloaded or uploaded)\n")
    total = made = 0
    for f in work.folders:
        todo = set(work.parts_to_make(f))
        for p in f.part_table or []:
            total += 1
            if p["name"] in todo:
                made += 1
                out.info(f"part {f.name or ROOT_LABEL}/{p['name']}: {p['files']} files, "
                         f"{human_bytes(p['bytes'])} -> s3://{ctx.cfg.bucket}/"
                         f"{ctx.layout.part_object(f.stem, p['name'])}\n")
        if f.large:
            out.info(f"large files of {f.name or ROOT_LABEL}: {f.large} "
                     f"({human_bytes(f.large_bytes)}), "
                     f"{len(work.done_large.get(f.stem, set()))} copy records exist\n")
    out.info(f"{made} of {total} parts to make\n")


def summarise(ctx: Run, work: Zipping, outcomes: list[tuple[Unit, Any]], plan_errors: list) -> int:
    """Say what was made, what failed and what was left out; the legacy progress objects of the
    folders finished now; the exit code."""
    made = skipped_files = unreadable = 0
    failed = list(work.problems) + [("listing of units", str(e)) for e in plan_errors]
    touched: set[str] = set()
    failed_folders: set[str] = set()
    for unit, result in outcomes:
        if isinstance(result, (StopRequested, Skipped)):
            continue
        if isinstance(result, Exception):
            failed.append((unit.what, str(result)))
            failed_folders.add(unit.folder)
            log.error("%s failed: %s", unit.what, result)
            continue
        touched.add(unit.folder)
        if unit.kind == "part":
            made += 1
            skipped_files += len(result.skipped)
            unreadable += sum(1 for sk in result.skipped if sk.get("unreadable"))
            work.done_parts.setdefault(result.stem, set()).add(result.part)
    ctx.runtime.check()
    for folder in work.folders:
        if folder.name in touched - failed_folders:
            write_legacy_progress(ctx.records, ctx.layout, folder, work.done_parts.get(folder.stem, set()))
    log.info("zipper finished: %d parts made, %d failed, %d files left out (%d changed or gone at SOURCE, "
             "%d unreadable there)", made, len(failed), skipped_files, skipped_files - unreadable, unreadable)
    if not work.view.complete:
        log.error("map generation %d is not complete: the mapper ended without mapping every folder; run "
                  "master_mapper.py again (it continues), then python_zipper.py", work.gen)
    if not failed and not skipped_files:
        if not work.view.complete:
            return EXIT_WAITING
        log.info("next: run python_unzipper.py")
        return EXIT_OK
    for what, why in failed:
        log.error("unfinished: %s: %s", what, why)
    if unreadable:
        log.error("%d files could not be read at SOURCE and were left out of their parts (each is named "
                  "above, with rclone's words); the rest of each part is uploaded. Once SOURCE gives them "
                  "(see the hint above, if any), run master_mapper.py with FORCE_RESCAN=1, then "
                  "python_zipper.py and python_unzipper.py: only what is missing moves", unreadable)
    log.error("run python_zipper.py again to retry what failed%s",
              "; files changed at SOURCE need FORCE_RESCAN=1 on the mapper" if skipped_files > unreadable else "")
    return EXIT_PARTIAL


def run(ctx: Run) -> int:
    start_run(ctx)
    upstream = Upstream(ctx)
    # A mapper started together with this zipper writes the map: its folders are zipped as they appear.
    view = wait_for_map(ctx, upstream, partial="any")
    if view is None:
        log.error("no complete map on S3 under %r: run master_mapper.py first", ctx.cfg.prefix)
        return EXIT_WAITING
    check_against_map(ctx, view.gen, view.source)
    passes = Passes(ctx, SCRIPT)
    work = Zipping(ctx, view, passes.failed)
    todo_parts = announce(ctx, work)
    if ctx.cfg.dry_run:
        print_plan(ctx, work)
        return EXIT_OK
    work.stale = list_stale_uploads(ctx.records, ctx.cfg.prefix) if todo_parts or not view.complete else {}
    passes.look_again_while(lambda: view.waiting(upstream))
    outcomes = passes.run(work.units)
    return summarise(ctx, work, outcomes, passes.plan_errors)


def main(argv: Sequence[str] | None = None, environ: dict | None = None) -> int:
    return run_script(SCRIPT, __doc__, run, argv, environ, options=("--status",))


if __name__ == "__main__":
    sys.exit(main())
