"""python_unzipper.py: restore the zip parts from S3 into DESTINATION and prove nothing was lost.

For every part the zipper has recorded and this script has not restored yet, it reads
the part with one streamed GET, checks it against the zipper's record (ETag, SHA-256,
each file's name, size and MD5), refuses unsafe entries, writes the files with their
modification times into a staging folder and uploads them to DESTINATION/<folder> with
rclone. When a folder is complete it recreates the empty directories, lists
DESTINATION and compares it with the map (paths and sizes, and hashes where
DESTINATION offers a kind that was recorded), and writes a report on S3 and under
WORK_DIR/reports. Folders the zipper has not finished are restored as far as they go
(exit code 4; run again later).

Usage: python python_unzipper.py [--help | --verify | --status [--html FILE]]

  --verify   check DESTINATION against the map, transfer nothing; print every missing,
             differing and extra file; exit 0 when all match, 3 otherwise. The next
             normal run restores exactly the damaged files.
  --status   one table of the whole migration across all stages, read from S3 (no lock)
  --html FILE  with --status: also write it as one self-contained HTML page (README: Status page)

Example:
  DESTINATION=gdrive:"Work Files" S3_BUCKET=my-hub S3_ENDPOINT=https://s3.wasabisys.com \\
    python python_unzipper.py
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from common_s3 import (all_generations, Config, count, describe_proof, DiskGate, EXIT_OK, EXIT_PARTIAL,
                       EXIT_USAGE, EXIT_WAITING, FolderEntry, FolderIndex, format_mtime, human_bytes,
                       IndexRecord, is_local_path, large_file_id, LargeRecord, latest_generation, Layout,
                       load_manifest, local_name, log_context, log_event, MapView, MIB, MigrationError, most_severe, mtime_ns, new_run_id,
                       Notice,
                       out, parse_mtime, PartRecord, Passes, plain_local_name, proof_warnings, Rclone,
                       RcloneError, read_index, read_jsonl_gz, RecordError, Records, remote_join,
                       RestoreRecord, ROOT_LABEL, Run, run_script, Runtime, sanitize_name, SERVER_MTIME, Skipped,
                       staging_dir, start_run, StopRequested, table_lines, Unit, Upstream, utc_now,
                       VerifiedRecord, wait_for_map, WorkerPool)

log = logging.getLogger("python_unzipper")

SCRIPT = "unzipper"
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


class PartDamaged(MigrationError):
    """A part on S3 does not match what the zipper recorded; it is not restored."""

    exit_code = EXIT_PARTIAL

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"part s3 key {key!r} is damaged or not what the zipper recorded: {problem}; "
                         "it was not restored (to rebuild it, delete its record under _parts/ and run "
                         "python_zipper.py again)")


# Pure checks

class DeleteLimit(MigrationError):
    """PROPAGATE_DELETES=1 would delete more than MAX_DELETE allows: nothing is deleted, a person decides."""

    exit_code = EXIT_USAGE


class PartNotMade(MigrationError):
    """A part of the map has no part record yet: the zipper is what to run, nothing is damaged."""


def unsafe_reason(path: str) -> str | None:
    """Why an entry name must not be written, or None when it stays inside its folder."""
    if not path:
        return "an empty name"
    if "\0" in path:
        return "a NUL byte in the name"
    if path.startswith("/"):
        return "an absolute path"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a '..', '.' or empty path component"
    return None


def destination_root(cfg: Config) -> str:
    return cfg.local_output_dir if cfg.skip_upload else cfg.destination


# Where restored files are placed directly, without rclone, when DESTINATION is a local path
LOCAL_TMP = ".python_unzipper.tmp"


def local_destination(cfg: Config, folders: Sequence[FolderEntry] = ()) -> str | None:
    """DESTINATION as a directory to write into directly (a plain local path), or None when
    rclone uploads (a remote, or a map whose top-level folder has our temporary name)."""
    root = destination_root(cfg)
    if not is_local_path(root) or any(f.name == LOCAL_TMP for f in folders):
        return None
    return root


def remove_local_tmp(root: str, *, everything: bool, worker_id: str = "") -> None:
    """The staging folder beside a local DESTINATION. ``everything`` (every folder of the map
    verified, by any worker): removed with what killed runs left in it. Otherwise only this
    worker's own staging folders go (other workers on this machine may be using theirs), and
    the folder itself when empty."""
    path = os.path.join(root, LOCAL_TMP)
    if everything:
        shutil.rmtree(path, ignore_errors=True)
        return
    if worker_id:
        with contextlib.suppress(OSError):
            for name in os.listdir(path):
                if name.endswith("." + worker_id):
                    shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def place_files(staging: str, target: str, names: Sequence[str]) -> None:
    """Move checked files from a staging folder under DESTINATION into place, each with one
    rename (a file is either the old one or the whole new one). A target on another
    filesystem gets a copy beside it first, renamed in the same way."""
    made: set[str] = set()
    for name in names:
        src, dst = os.path.join(staging, name), os.path.join(target, name)
        parent = os.path.dirname(dst)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        try:
            os.replace(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            tmp = os.path.join(parent, f".{os.path.basename(dst)}.{os.getpid()}.partial")
            try:
                shutil.copy2(src, tmp)
                os.replace(tmp, dst)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)


# Reading a part

class _Stream:
    """Sequential reads of an S3 body with position and SHA-256 of everything read.

    The body is read a MiB at a time into a buffer and hashed as it arrives; the many small
    reads of a part of small files (headers, names, contents) are served from that buffer.
    """

    def __init__(self, body: Any):
        self.body = body
        self.pos = 0  # bytes handed out
        self.sha256 = hashlib.sha256()
        self._buf = memoryview(b"")

    def _fill(self) -> memoryview:
        if not len(self._buf):
            chunk = self.body.read(MIB)
            if not chunk:
                raise EOFError(f"the object ended at byte {self.pos}")
            self.sha256.update(chunk)
            self._buf = memoryview(chunk)
        return self._buf

    def _take(self, n: int) -> memoryview:
        buf = self._fill()
        piece, self._buf = buf[:n], buf[n:]
        self.pos += len(piece)
        return piece

    def read_exact(self, n: int) -> bytes:
        pieces = []
        left = n
        while left:
            piece = self._take(left)
            pieces.append(piece)
            left -= len(piece)
        return b"".join(pieces)

    def copy_to(self, n: int, fh: Any, md5: Any = None) -> int:
        """Copy the next n bytes to fh (None: skip them); return their CRC-32, and feed
        ``md5`` too when one is given."""
        left = n
        crc = 0
        while left:
            piece = self._take(left)
            crc = zlib.crc32(piece, crc)
            if md5 is not None:
                md5.update(piece)
            if fh is not None:
                fh.write(piece)
            left -= len(piece)
        return crc

    def drain(self) -> None:
        self.pos += len(self._buf)
        self._buf = memoryview(b"")
        while True:
            chunk = self.body.read(MIB)
            if not chunk:
                return
            self.sha256.update(chunk)
            self.pos += len(chunk)


def _extract_entries(stream: "_Stream", key: str, entries: list[dict], keep: dict[str, dict], staging: str,
                     runtime: Runtime, names: list[str] | None) -> int:
    """The entries of one part, read in offset order from its stream (see ``extract_part``)."""
    written = 0
    for entry in sorted(entries, key=lambda e: e["offset"]):
        runtime.check()
        if entry["offset"] < stream.pos:
            raise PartDamaged(key, f"entry {entry['path']!r} overlaps the previous one")
        stream.read_exact(entry["offset"] - stream.pos)
        sig, _ver, flags, method, _t, _d, _crc, _cs, _us, name_len, extra_len = \
            LOCAL_HEADER.unpack(stream.read_exact(LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise PartDamaged(key, f"no local header at offset {entry['offset']}")
        raw_name = stream.read_exact(name_len)
        stream.read_exact(extra_len)
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "surrogateescape")
        if name != entry["path"]:
            raise PartDamaged(key, f"entry at offset {entry['offset']} is {name!r}, "
                                   f"recorded {entry['path']!r}")
        if method != 0:
            raise PartDamaged(key, f"entry {name!r} is compressed (method {method}), parts are stored")
        row = keep.get(name)
        # Each file is checked against the zipper's CRC-32 (its MD5 when no CRC was recorded);
        # the SHA-256 of the whole object is checked before any file leaves staging.
        md5 = None if entry.get("crc32") else hashlib.md5()
        if row is None:
            stream.copy_to(entry["size"], None)
            continue
        if entry["size"] != row["size"]:
            raise PartDamaged(key, f"entry {name!r} has {entry['size']} bytes, the map says {row['size']}")
        target = os.path.join(staging, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as fh:
            crc = stream.copy_to(entry["size"], fh, md5)
        if md5 is None and f"{crc:08x}" != entry["crc32"].lower():
            raise PartDamaged(key, f"{name!r} has CRC-32 {crc:08x}, recorded {entry['crc32']}")
        if md5 is not None and md5.hexdigest() != entry.get("md5"):
            raise PartDamaged(key, f"{name!r} has MD5 {md5.hexdigest()}, recorded {entry.get('md5')}")
        # The file's own mtime as the zipper recorded it (for a map of files' own mtimes the
        # map's very string; for SERVER_MTIME the downloaded file's, which the map lacks).
        mtime = entry.get("mtime") or row["mtime"]
        if mtime:
            ns = mtime_ns(mtime)
            os.utime(target, ns=(ns, ns))
        written += 1
        if names is not None:
            names.append(name)
    stream.drain()
    return written


def extract_part(records: Records, record: PartRecord, entries: list[dict], keep: dict[str, dict],
                 staging: str, runtime: Runtime, names: list[str] | None = None) -> int:
    """One streamed GET of the part; write the kept entries into staging, checking everything.

    ``keep`` maps path -> map row for the entries this generation takes from this part.
    Returns the number of files written; their paths are appended to ``names``.
    """
    key = record.key
    with records.open(key) as (body, etag):
        if record.etag and etag != record.etag:
            raise PartDamaged(key, f"ETag {etag} differs from the recorded {record.etag}")
        stream = _Stream(body)
        try:
            written = _extract_entries(stream, key, entries, keep, staging, runtime, names)
        except EOFError as exc:
            raise PartDamaged(key, f"the object is shorter than recorded ({exc})") from None
    if stream.pos != record.size:
        raise PartDamaged(key, f"{stream.pos} bytes read, recorded {record.size}")
    if stream.sha256.hexdigest() != record.sha256:
        raise PartDamaged(key, "SHA-256 of the object differs from the record")
    return written


@dataclass
class RestoreJob:
    folder: str
    stem: str
    part: str
    gen: int
    keep: dict[str, dict]
    repair: bool = False
    local: str | None = None  # DESTINATION's directory, when files are placed without rclone


def read_part_record(records: Records, layout: Layout, stem: str, part: str) -> tuple[PartRecord, list[dict]]:
    """The zipper's record and entries of a part, checked against each other."""
    rkey = layout.part_record(stem, part)
    found = records.get_json(rkey)
    if found is None:
        raise PartNotMade(f"part {part} of this folder has not been made yet (no {rkey!r}): "
                          "run python_zipper.py, then python_unzipper.py")
    record = PartRecord.from_json(rkey, found)
    body = records.get_bytes(record.entries_key)
    if body is None:
        raise RecordError(record.entries_key, "missing, although the part record names it")
    if hashlib.sha256(body).hexdigest() != record.entries_sha256:
        raise RecordError(record.entries_key, "its SHA-256 differs from the part record")
    entries = list(read_jsonl_gz(body, record.entries_key))
    for e in entries:
        if not isinstance(e.get("path"), str) or not isinstance(e.get("offset"), int):
            raise RecordError(record.entries_key, f"an entry without path or offset: {e!r:.200}")
    return record, entries


def restore_part(ctx: Run, job: RestoreJob) -> dict:
    """Restore one part (for a repair, only the damaged files of it) into DESTINATION; record it."""
    cfg, records, layout, rclone, runtime = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime
    gate = ctx.gate if ctx.gate is not None else DiskGate(cfg, runtime)
    nbytes = sum(r["size"] for r in job.keep.values())
    with runtime.progress.unit(f"{job.folder or ROOT_LABEL}/{job.part}", job.folder, nbytes), \
            log_context(folder=job.folder, part=job.part):
        record, entries = read_part_record(records, layout, job.stem, job.part)
        key = record.key
        for e in entries:
            reason = unsafe_reason(e["path"])
            if reason:
                raise PartDamaged(key, f"entry {e['path']!r} has {reason}")
        claimed = sum(int(e.get("size", 0)) for e in entries)
        if record.size and claimed > cfg.max_zip_bomb_ratio * record.size:
            raise PartDamaged(key, f"entries claim {claimed} bytes, over MAX_ZIP_BOMB_RATIO="
                                   f"{cfg.max_zip_bomb_ratio:g} times the part's {record.size}")
        recorded = {e["path"] for e in entries}
        missing = [p for p in job.keep if p not in recorded]
        if missing:
            log.error("%d files the map puts in this part are not in it (first: %r); the verification "
                      "will report them", len(missing), missing[0])
        need = sum(r["size"] for r in job.keep.values())
        what = f"part {job.part} of {job.folder or ROOT_LABEL}"
        local = job.local
        if local is not None:  # staged beside DESTINATION, then renamed into place
            # Named by worker too: workers on one machine may share a local DESTINATION.
            staging = os.path.join(local, LOCAL_TMP, local_name(job.stem, job.part, cfg.worker_id))
            reserve: Any = contextlib.nullcontext()
        else:
            staging = os.path.join(cfg.tmp_dir, local_name(job.stem, job.part))
            reserve = gate.reserve(need + MIB, what)
        started = time.monotonic()
        written_names: list[str] = []
        with reserve, staging_dir(staging, what):
            def fetch() -> int:
                shutil.rmtree(staging, ignore_errors=True)
                os.makedirs(staging)
                written_names.clear()
                return extract_part(records, record, entries, job.keep, staging, runtime, written_names)
            written = records.retry(f"read of {key}", fetch)
            fetched = time.monotonic()
            if written and local is not None:
                runtime.check()
                plain = [n for n in written_names if plain_local_name(n)]
                place_files(staging, os.path.join(local, job.folder) if job.folder else local, plain)
                if len(plain) < written:  # names rclone encodes: rclone writes them, as it lists them
                    upload_staging(cfg, rclone, staging, job.folder, f"upload of part {job.part}", need,
                                   ["--no-check-dest"])
            elif written:
                # Every staged file is checked: it is uploaded without looking at DESTINATION first
                # (no request per file there), and a repair overwrites what looks right by size and time.
                upload_staging(cfg, rclone, staging, job.folder, f"upload of part {job.part}", need,
                               ["--no-check-dest"])
        save_sums(cfg, job.stem, job.part, entries)
        out = RestoreRecord(key=key, folder=job.folder, stem=job.stem, part=job.part, generation=job.gen,
                            etag=record.etag, sha256=record.sha256, files=written, restored_at=utc_now(),
                            worker=cfg.worker_id).to_json()
        if not job.repair:
            records.put_json_once(layout.restored_record(job.stem, job.part), out)
        log_event(log, logging.INFO, "part_restored",
                  {"files": written, "bytes": need, "seconds": round(time.monotonic() - started, 3)},
                  "part restored: %s, %s in %.1fs (read %.1fs, upload %.1fs)", count(written, "file"),
                  human_bytes(need), time.monotonic() - started, fetched - started, time.monotonic() - fetched)
        return out


def upload_staging(cfg: Config, rclone: Rclone, staging: str, folder: str, what: str, nbytes: int,
                   flags: Sequence[str] = ()) -> None:
    """rclone copy of a staging folder to DESTINATION/<folder>, keeping mtimes."""
    dest = remote_join(destination_root(cfg), folder) if folder else destination_root(cfg)
    rclone.run_retried(["copy", "--transfers", str(cfg.upload_threads), *flags, "--", staging, dest],
                       what=what, timeout_s=cfg.rclone_timeout_s + nbytes / (512 * 1024))


# Finishing a folder: empty directories, verification

def create_dirs(cfg: Config, rclone: Rclone, folder: str, stem: str, index: FolderIndex) -> None:
    dest_root = destination_root(cfg)
    dirs = [r["path"] for r in index.rows("d")]
    local = local_destination(cfg)
    if local is not None and all(plain_local_name(d) for d in dirs):
        top = os.path.join(local, folder) if folder else local
        for d in [""] + dirs:
            os.makedirs(os.path.join(top, d), exist_ok=True)
        return
    if dirs:
        staging = os.path.join(cfg.tmp_dir, local_name(stem, "dirs"))
        try:
            for d in dirs:
                os.makedirs(os.path.join(staging, d), exist_ok=True)
            dest = remote_join(dest_root, folder) if folder else dest_root
            rclone.run_retried(["copy", "--create-empty-src-dirs", "--", staging, dest],
                               what=f"creation of {len(dirs)} empty directories")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:  # the folder itself, also DESTINATION's root, which an empty root folder may be first to need
        dest = remote_join(dest_root, folder) if folder else dest_root
        rclone.run_retried(["mkdir", "--", dest], what=f"creation of {folder or dest!r}")


def sums_path(cfg: Config, stem: str, part: str) -> str:
    return os.path.join(cfg.tmp_dir, local_name(stem, part, "sums.jsonl"))


def save_sums(cfg: Config, stem: str, part: str, entries: list[dict]) -> None:
    """Keep a restored part's recorded MD5 and CRC-32 per file for the folder's verification
    in this run (the temporary folder is emptied at every start), so that it need not read
    the part's record and entries from S3 again."""
    path = sums_path(cfg, stem, part)
    with open(path + ".tmp", "w", encoding="utf-8", errors="surrogateescape") as fh:
        for e in entries:
            fh.write(json.dumps([e["path"], e.get("md5"), e.get("crc32"), e.get("mtime")], ensure_ascii=False)
                     + "\n")
    os.replace(path + ".tmp", path)


def part_sums(cfg: Config, records: Records, layout: Layout, stem: str, part: str) -> Iterator[tuple]:
    """(path, md5, crc32, mtime) of every entry of a part: kept from its restore in this run, or
    read from S3 (and checked against the part record)."""
    path = sums_path(cfg, stem, part)
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                row = json.loads(line)
                yield tuple(row) + (None,) * (4 - len(row))
        return
    _record, entries = read_part_record(records, layout, stem, part)
    for e in entries:
        yield e["path"], e.get("md5"), e.get("crc32"), e.get("mtime")


def load_part_md5s(cfg: Config, records: Records, layout: Layout, stem: str, parts: set[str],
                   index: FolderIndex) -> None:
    """Put each file's MD5, CRC-32 and mtime recorded by the zipper into the index (table md5)."""
    index.db.execute("CREATE TABLE IF NOT EXISTS md5 (path TEXT PRIMARY KEY, md5 TEXT, crc32 TEXT, mtime TEXT)")
    for part in sorted(parts):
        index.db.executemany("INSERT OR REPLACE INTO md5 SELECT ?, ?, ?, ? WHERE EXISTS "
                             "(SELECT 1 FROM e WHERE e.path = ? AND e.part = ?)",
                             [(p, md5, crc, mtime, p, part)
                              for p, md5, crc, mtime in part_sums(cfg, records, layout, stem, part)])
    index.commit()


@dataclass
class DestListing:
    """One folder of DESTINATION as listed for a check: its files (an iterator, read once), and
    once they are read, its directories and whether the folder exists at all; with what each
    file is compared besides its size."""

    kind: str | None          # hash kind listed: crc32 (local, read back), md5, a kind SOURCE recorded, or None
    entries: Iterator[dict]
    check_mtime: bool         # DESTINATION keeps mtimes (to 1 s or better), so they are compared
    read_back: bool           # every file was read back (a local DESTINATION, or VERIFY_DOWNLOAD=1)
    dirs: set[str] = field(default_factory=set)
    exists: bool = True
    slow_hash_skipped: bool = False  # DESTINATION has hashes, but each costs a read (asked for by --verify)

    @property
    def compared(self) -> list[str]:
        return ["size"] + ([self.kind] if self.kind else []) + (["mtime"] if self.check_mtime else [])


def list_destination(cfg: Config, rclone: Rclone, folder: str, dest_features: dict, source_kinds: set[str],
                     *, thorough: bool = False) -> DestListing:
    """DESTINATION/<folder> as a DestListing. A local DESTINATION is read back in place (every
    file's CRC-32); a remote is listed with ``lsjson`` and MD5 where it offers it, else a kind
    SOURCE recorded; with VERIFY_DOWNLOAD=1 every file is read back for its MD5 instead. A
    folder that does not exist lists as empty with ``exists`` False; a listing that fails
    otherwise raises.
    Hashes that DESTINATION computes by reading each file (SFTP's md5sum: rclone's SlowHash) are
    asked for only when ``thorough`` (``--verify``); the final check after a restore then
    compares size and mtime, rclone's upload having checked the hash already."""
    dest_root = destination_root(cfg)
    dest = remote_join(dest_root, folder) if folder else dest_root
    local = local_destination(cfg)
    if local is not None:
        top = os.path.join(local, folder) if folder else local
        result = DestListing("crc32", iter(()), True, True)
        result.exists = os.path.isdir(top)
        result.entries = list_local(top, recursive=bool(folder), skip=() if folder else (LOCAL_TMP,),
                                    dirs=result.dirs)
        return result
    offered = set(dest_features.get("Hashes") or [])
    slow_skipped = bool(offered) and bool(dest_features.get("SlowHash")) and not thorough
    if slow_skipped:
        offered = set()
    kind = "md5" if "md5" in offered or cfg.verify_download else None
    if kind is None:
        shared = sorted(offered & source_kinds)
        kind = shared[0] if shared else None
    flags = ["--no-mimetype"] + (["-R"] if folder else ["--files-only"])
    if kind and not cfg.verify_download:
        flags += ["--hash", "--hash-type", kind]
    precision = dest_features.get("Precision")
    check_mtime = isinstance(precision, (int, float)) and 0 < precision <= 1_000_000_000
    result = DestListing(kind, iter(()), check_mtime, cfg.verify_download)
    result.slow_hash_skipped = slow_skipped and kind is None

    def listing() -> Iterator[dict]:
        files = []
        try:
            for entry in rclone.lsjson(dest, flags, what=f"listing of {dest!r}"):
                if entry.get("IsDir"):
                    result.dirs.add(entry["Path"])
                elif cfg.verify_download:
                    files.append(entry)
                else:
                    yield entry
        except RcloneError as exc:
            if "directory not found" not in str(exc):
                raise
            result.exists = False
            return
        if cfg.verify_download and files:
            sums = rclone.md5_by_download(dest, what=f"read-back of {dest!r} (VERIFY_DOWNLOAD=1)",
                                          flags=() if folder else ("--max-depth", "1"))
            for entry in files:
                entry["Hashes"] = {"md5": sums.get(entry["Path"])}
                yield entry
    result.entries = listing()
    return result


def compare_rows(ctx: Run, stem: str, index: FolderIndex, listed: DestListing, report: dict) -> dict[str, dict]:
    """Each file of the map against DESTINATION's listing (table ``dest``): missing, differing
    (size, the hash kind compared, mtime where kept), or matched by hash or by size; counted
    into ``report``. Returns the folder's large files {path: row}."""
    kind, check_mtime = listed.kind, listed.check_mtime
    server = index.mtime_kind == SERVER_MTIME  # the map's times are LastModified: own ones are recorded
    larges: dict[str, dict] = {}
    rows = index.db.execute(
        "SELECT e.path, e.kind, e.size, e.mtime, e.hashes, m.md5, m.crc32, m.mtime, d.size, d.mtime, d.hash "
        "FROM e LEFT JOIN md5 m ON m.path = e.path LEFT JOIN dest d ON d.path = e.path "
        "WHERE e.kind IN ('f', 'l') ORDER BY e.path")
    for path, k, size, mtime, hashes, md5, crc32, own, dsize, dmtime, dhash in rows:
        report["files"] += 1
        report["bytes"] += size
        if k == "l":
            larges[path] = {"path": path, "size": size, "mtime": mtime}
        if dsize is None:
            report["missing"].append(path)
            continue
        if dsize != size:
            report["differing"].append({"path": path, "why": f"size {dsize} != {size}"})
            continue
        want = None
        if kind == "md5":
            want = md5 or json.loads(hashes or "{}").get("md5") or (large_md5(ctx.records, ctx.layout, stem, path, size, mtime)
                                                                  if k == "l" else None)
        elif kind == "crc32":
            want = crc32
        elif kind:
            want = json.loads(hashes or "{}").get(kind)
        if want and dhash:
            if dhash.lower() != want.lower():
                report["differing"].append({"path": path, "why": f"{kind} {dhash} != {want}"})
                continue
            report["matched_by_hash"] += 1
        else:
            report["matched_by_size"] += 1
        then = mtime  # the file's own mtime at SOURCE: the map's, or with LastModified the zipper's record
        if server and check_mtime:
            then = own if k == "f" else getattr(large_record(ctx.records, ctx.layout, stem, path, size, mtime),
                                                "mtime", None)
        why = None
        if check_mtime and server and not then:
            why = "its own modification time was not recorded by the zipper"
        elif check_mtime and then and dmtime and abs(parse_mtime(dmtime) - parse_mtime(then)) > 1.0:
            why = f"modification time {dmtime} != {then}"
        if why:
            report["differing"].append({"path": path, "why": why})
            report["matched_by_hash" if want and dhash else "matched_by_size"] -= 1
    return larges


def verify_folder(ctx: Run, folder: str, stem: str, index: FolderIndex, dest_features: dict,
                  deletions: "Deletions | None" = None, *, thorough: bool = False) -> dict:
    """Compare DESTINATION/<folder> with the map: paths, sizes, hashes where a kind is shared.
    With ``deletions`` (files deleted at SOURCE in this or an earlier generation), copies of
    those are set apart from the extra files and, when the folder matches and
    PROPAGATE_DELETES=1, deleted where they still match what was restored."""
    cfg, records, layout, rclone = ctx.cfg, ctx.records, ctx.layout, ctx.rclone
    parts = {r["part"] for r in index.rows("f")}
    load_part_md5s(cfg, records, layout, stem, parts, index)
    source_kinds: set[str] = set()
    for row in index.db.execute("SELECT hashes FROM e WHERE kind IN ('f','l') AND hashes != '{}' LIMIT 1"):
        source_kinds = set(json.loads(row[0]))
    listed = list_destination(cfg, rclone, folder, dest_features, source_kinds, thorough=thorough)
    kind, check_mtime = listed.kind, listed.check_mtime
    db = index.db
    db.execute("CREATE TABLE IF NOT EXISTS dest (path TEXT PRIMARY KEY, size INTEGER, mtime TEXT, hash TEXT)")
    for entry in listed.entries:
        db.execute("INSERT OR REPLACE INTO dest VALUES (?,?,?,?)",
                   (entry["Path"], int(entry.get("Size", -1)), entry.get("ModTime", ""),
                    (entry.get("Hashes") or {}).get(kind) if kind else None))
    index.commit()
    report = {"folder": folder, "stem": stem, "hash_kind": kind, "compared": listed.compared,
              "read_back": listed.read_back, "not_kept": [] if check_mtime else ["mtime"],
              "slow_hash_skipped": listed.slow_hash_skipped,
              "files": 0, "bytes": 0, "dirs": 0, "matched_by_hash": 0, "matched_by_size": 0,
              "missing": [], "differing": [], "extra": []}
    larges = compare_rows(ctx, stem, index, listed, report)
    # Empty directories are part of the proof, and so is the folder itself.
    if folder and not listed.exists:
        report["missing"].append("")
    else:
        for row in index.rows("d"):
            report["dirs"] += 1
            if row["path"] not in listed.dirs:
                report["missing"].append(row["path"] + "/")
    for (path,) in db.execute("SELECT path FROM dest WHERE path NOT IN (SELECT path FROM e) ORDER BY path"):
        if deletions is None or path not in deletions.files:
            report["extra"].append(path)
    report["ok"] = not report["missing"] and not report["differing"]
    damaged = set(report["missing"]) | {d["path"] for d in report["differing"]}
    report["large_damaged"] = [row for path, row in larges.items() if path in damaged]
    report["left_out"] = left_out_reasons(records, layout, stem) if report["missing"] else {}
    if deletions is not None:
        present = {p: (size, mtime, h) for p, size, mtime, h in db.execute(
            "SELECT path, size, mtime, hash FROM dest WHERE path NOT IN (SELECT path FROM e)")}
        keep_dirs = needed_dirs(r["path"] for r in index.rows())
        report["deleted_at_source"] = deletions.apply(ctx, folder, present, listed, keep_dirs, act=report["ok"])
    return report


def left_out_reasons(records: Records, layout: Layout, stem: str) -> dict[str, str]:
    """{path: why} of the files the zipper left out of this folder's parts as unreadable at SOURCE."""
    found = {}
    for item in records.list_keys(layout.left_out_of(stem)):
        marker = records.get_json(item["Key"])
        for f in (marker.get("files") if isinstance(marker, dict) else None) or []:
            if isinstance(f, dict) and isinstance(f.get("path"), str):
                found[f["path"]] = str(f.get("reason", ""))
    return found


def large_md5(records: Records, layout: Layout, stem: str, path: str, size: int, mtime: str) -> str | None:
    """The MD5 the zipper took of a large file when it read both ends back after its copy."""
    record = large_record(records, layout, stem, path, size, mtime)
    return record.md5 if record is not None else None


def large_record(records: Records, layout: Layout, stem: str, path: str, size: int,
                 mtime: str) -> LargeRecord | None:
    """The zipper's record of the copy of a large file as mapped (size and the map's mtime), if any."""
    key = layout.large_record(stem, large_file_id(path, size, mtime))
    found = records.get_json(key)
    return LargeRecord.from_json(key, found) if found is not None else None


def needed_dirs(paths: Iterable[str]) -> set[str]:
    """Every directory the map needs: empty directories and the parents of every entry."""
    out: set[str] = set()
    for path in paths:
        out.add(path)
        while "/" in path:
            path = path.rpartition("/")[0]
            if path in out:
                break
            out.add(path)
    return out


class Deletions:
    """Files and empty directories deleted at SOURCE for one folder stem, over every generation
    up to the latest (the latest deletion of a path wins; a path at SOURCE again is dropped)."""

    def __init__(self, stem: str, sources: list[dict]):
        self.stem = stem
        self.sources = sorted(sources, key=lambda s: s["generation"])
        self.files: dict[str, dict] = {}
        self.dirs: set[str] = set()

    def load(self, records: Records, index: FolderIndex | None) -> "Deletions":
        for source in self.sources:
            key = source["changes_key"]
            body = records.get_bytes(key)
            if body is None:
                raise RecordError(key, "missing, although the map's index names it")
            for line in read_jsonl_gz(body, key):
                op, path = line.get("op"), line.get("p")
                if not isinstance(path, str) or unsafe_reason(path):
                    raise RecordError(key, f"a change without a safe path: {line!r:.200}")
                if op == "deleted":
                    was = line.get("was")
                    if not isinstance(was, dict) or not isinstance(was.get("s"), int):
                        raise RecordError(key, f"a deletion without what it was: {line!r:.200}")
                    self.files[path] = {**was, "generation": source["generation"]}
                elif op == "dir_removed":
                    self.dirs.add(path)
                elif op in ("added", "changed"):
                    self.files.pop(path, None)
                elif op == "dir_added":
                    self.dirs.discard(path)
        if index is not None:  # at SOURCE again (re-added): not a deletion any more
            self.files = {p: w for p, w in self.files.items() if index.get(p) is None}
            self.dirs = {d for d in self.dirs if index.get(d) is None}
        return self

    def _restored_sums(self, cfg: Config, records: Records, layout: Layout, paths: Iterable[str]) -> dict:
        """(md5, crc32, mtime) the zipper recorded for each path, from the parts that held the old
        bytes; for a large file mapped with LastModified (SERVER_MTIME), its record's mtime."""
        by_part: dict[str, set[str]] = {}
        sums: dict[str, tuple] = {}
        for path in paths:
            was = self.files[path]
            if was.get("part"):
                by_part.setdefault(was["part"], set()).add(path)
            elif was.get("mtime_kind") == SERVER_MTIME and was.get("t") == "l":
                record = large_record(records, layout, self.stem, path, was["s"], was.get("m", ""))
                sums[path] = (None, None, record.mtime if record is not None else None)
        for part, wanted in by_part.items():
            try:
                for path, md5, crc, mtime in part_sums(cfg, records, layout, self.stem, part):
                    if path in wanted:
                        sums[path] = (md5, crc, mtime)
            except RecordError as exc:
                log.warning("the record of part %s is unreadable (%s); its deleted files are compared by "
                            "size and time only", part, exc)
        return sums

    def differs(self, path: str, size: int, mtime: str, dhash: str | None, kind: str | None,
                check_mtime: bool, sums: dict) -> str | None:
        """Why DESTINATION's copy is not what was restored there (None when it is)."""
        was = self.files[path]
        if size != was["s"]:
            return f"size {size} != restored {was['s']}"
        md5, crc, own = sums.get(path, (None, None, None))
        # ``m`` is the file's own mtime, or (SERVER_MTIME) S3's LastModified: then the zipper's record.
        then = own if was.get("mtime_kind") == SERVER_MTIME else was.get("m")
        if check_mtime and was.get("mtime_kind") == SERVER_MTIME and not then:
            return "its modification time when restored was not recorded"
        if check_mtime and then and mtime and abs(parse_mtime(mtime) - parse_mtime(then)) > 1.0:
            return f"modification time {mtime} != restored {then}"
        hashes = was.get("h") or {}
        want = (crc if kind == "crc32" else (md5 or hashes.get("md5")) if kind == "md5"
                else hashes.get(kind) if kind else None)
        if want and dhash and dhash.lower() != want.lower():
            return f"{kind} {dhash} != restored {want}"
        return None

    def apply(self, ctx: Run, folder: str, present: dict[str, tuple], listed: "DestListing",
              keep_dirs: set[str], *, act: bool) -> dict:
        """Sort DESTINATION's copies of deleted files: kept (PROPAGATE_DELETES is off), deleted,
        or kept because they changed at DESTINATION since they were restored. Deletes with
        PROPAGATE_DELETES=1 and ``act`` (the folder verified), then removes the directories left
        empty that SOURCE no longer has. Returns the summary for the report."""
        cfg, records, layout, rclone = ctx.cfg, ctx.records, ctx.layout, ctx.rclone
        kind, check_mtime = listed.kind, listed.check_mtime
        here = sorted(p for p in self.files if p in present)
        out: dict[str, Any] = {"files": len(self.files), "absent": len(self.files) - len(here),
                               "kept": [], "deleted": [], "changed_at_destination": [], "dirs_removed": []}
        if not cfg.propagate_deletes or not act:
            out["kept"] = here
            if here:
                log.warning("%d files deleted at SOURCE are kept at DESTINATION (first: %r); PROPAGATE_DELETES=1 "
                            "deletes them", len(here), here[0])
            return out
        own_times = check_mtime and any(self.files[p].get("mtime_kind") == SERVER_MTIME for p in here)
        sums = self._restored_sums(cfg, records, layout, here) if kind in ("crc32", "md5") or own_times else {}
        doomed = []
        for path in here:
            why = self.differs(path, *present[path], kind, check_mtime, sums)
            if why:
                out["changed_at_destination"].append({"path": path, "why": why})
                log.warning("deleted at SOURCE but changed at DESTINATION since it was restored, so kept: %r (%s)",
                            path, why)
            else:
                doomed.append(path)
        delete_at_destination(cfg, rclone, folder, doomed)
        out["deleted"] = doomed
        parents = needed_dirs(doomed) - set(doomed)
        candidates = sorted((self.dirs | parents) - keep_dirs, key=lambda d: (-d.count("/"), d))
        out["dirs_removed"] = remove_empty_dirs(cfg, rclone, folder, candidates)
        if doomed or out["dirs_removed"]:
            log.info("PROPAGATE_DELETES: deleted %d files and %d directories that SOURCE no longer has",
                     len(doomed), len(out["dirs_removed"]))
        return out


def delete_at_destination(cfg: Config, rclone: Rclone, folder: str, paths: Sequence[str]) -> None:
    if not paths:
        return
    local = local_destination(cfg)
    if local is not None and all(plain_local_name(p) for p in paths):
        top = os.path.join(local, folder) if folder else local
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(top, path))
        return
    dest_root = destination_root(cfg)
    dest = remote_join(dest_root, folder) if folder else dest_root
    list_path = os.path.join(cfg.tmp_dir, local_name(folder or "~root", "delete", cfg.worker_id))
    with open(list_path, "wb") as fh:
        fh.write(b"\0".join(p.encode("utf-8", "surrogateescape") for p in paths))
    try:
        rclone.run_retried(["delete", "--files-from0", list_path, "--", dest],
                           what=f"deletion of {len(paths)} files deleted at SOURCE")
    finally:
        os.remove(list_path)


def remove_empty_dirs(cfg: Config, rclone: Rclone, folder: str, dirs: Sequence[str]) -> list[str]:
    """Remove these directories where they are empty, deepest first; a directory that holds
    anything stays. Returns the ones removed."""
    removed = []
    local = local_destination(cfg)
    dest_root = destination_root(cfg)
    for d in dirs:
        if local is not None and plain_local_name(d):
            try:
                os.rmdir(os.path.join(local, folder, d) if folder else os.path.join(local, d))
                removed.append(d)
            except OSError:
                pass
            continue
        target = remote_join(dest_root, f"{folder}/{d}" if folder else d)
        try:
            rclone.run(["rmdir", "--", target], what=f"removal of empty directory {d!r}", timeout_s=120, quiet=True)
            removed.append(d)
        except RcloneError:
            pass  # not empty, or already gone
    return removed


def list_local(top: str, *, recursive: bool, skip: Sequence[str] = (), dirs: set[str] | None = None
               ) -> Iterator[dict]:
    """Plain files under a local folder as rclone lsjson would list them (symlinks are not
    followed), each with the CRC-32 of its bytes as read back from the disk. With ``dirs``,
    every directory below ``top`` is added to it as it is walked."""
    if not os.path.isdir(top):
        return
    block = bytearray(MIB)
    view = memoryview(block)
    for dirpath, dirnames, filenames in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        if rel_dir == ".":
            rel_dir = ""
            dirnames[:] = [d for d in dirnames if d not in skip]
        if not recursive:
            dirnames[:] = []
        if dirs is not None:
            dirs.update(f"{rel_dir}/{d}" if rel_dir else d for d in dirnames)
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            crc = 0
            with open(full, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(block)
                    if not n:
                        break
                    crc = zlib.crc32(view[:n], crc)
            yield {"Path": f"{rel_dir}/{name}" if rel_dir else name, "Size": st.st_size,
                   "ModTime": format_mtime(st.st_mtime), "Hashes": {"crc32": f"{crc:08x}"}}


def unchanged_since(folder: FolderEntry, index: IndexRecord) -> int | None:
    """The previous generation when this folder is exactly as it was there (nothing added,
    changed or deleted, no empty directory added or removed), else None."""
    c = folder.changes
    previous = index.previous
    if not isinstance(c, dict) or previous is None or c.get("new_folder") or "dirs_added" not in c:
        return None  # (a map made before directories and large files were counted: verify in full)
    if any(c.get(k) for k in ("added", "changed", "deleted", "dirs_added", "dirs_removed")):
        return None
    return int(previous)


def carry_verification(records: Records, layout: Layout, gen: int, folder: FolderEntry,
                       previous: int) -> dict | None:
    """A folder unchanged since a generation in which it was verified stays verified: its files,
    parts and DESTINATION copies are the ones checked then (``--verify`` reads DESTINATION again).
    Returns the report entry, or None when the previous generation was not verified."""
    key = layout.verified_record(previous, folder.stem)
    found = records.get_json(key)
    if found is None:
        return None
    before = VerifiedRecord.from_json(key, found)
    record = VerifiedRecord(folder=folder.name, generation=gen, verified_at=utc_now(), files=before.files,
                            bytes=before.bytes, matched_by_hash=before.matched_by_hash,
                            matched_by_size=before.matched_by_size, hash_kind=before.hash_kind, extra=before.extra,
                            carried_from=before.carried_from if before.carried_from is not None else previous)
    records.put_json_once(layout.verified_record(gen, folder.stem), record.to_json())
    log.info("folder %r is unchanged since generation %d, verified then; kept as verified", folder.name, previous)
    return {"folder": folder.name, "stem": folder.stem, "state": "verified", "ok": True,
            "files": record.files or 0, "carried_from": record.carried_from, "missing": [],
            "differing": [], "extra": []}


def record_deletions(records: Records, layout: Layout, cfg: Config, gen: int, name: str, stem: str,
                     summary: dict) -> None:
    """PROPAGATE_DELETES did its work for this folder at generation ``gen``: what it deleted
    and what it kept (a rerun of the same generation does not look again)."""
    records.put_json(layout.deletions(gen, stem), {
        "folder": name, "generation": gen, "at": utc_now(), "worker": cfg.worker_id,
        **{k: summary.get(k) for k in ("files", "absent", "deleted", "changed_at_destination", "dirs_removed")}})


def finish_removed(ctx: Run, gen: int, name: str, stem: str, deletions: Deletions, dest_features: dict) -> dict:
    """A folder SOURCE no longer has: its copies at DESTINATION are reported, or with
    PROPAGATE_DELETES=1 deleted where they still match what was restored, and the folder
    removed once empty."""
    cfg, records, layout, rclone = ctx.cfg, ctx.records, ctx.layout, ctx.rclone
    with log_context(folder=name):
        if not cfg.propagate_deletes:
            kept = sorted(deletions.files)
            log.warning("folder %r is no longer at SOURCE; its %d files stay at DESTINATION (PROPAGATE_DELETES=1 "
                        "deletes them)", name, len(kept))
            return {"folder": name, "stem": stem, "destination": "kept",
                    "deleted_at_source": {"files": len(kept), "kept": kept, "deleted": [],
                                          "changed_at_destination": [], "dirs_removed": []}}
        kinds = {k for w in deletions.files.values() for k in (w.get("h") or {})}
        listed = list_destination(cfg, rclone, name, dest_features, kinds)
        kind = listed.kind
        present = {e["Path"]: (int(e.get("Size", -1)), e.get("ModTime", ""),
                               (e.get("Hashes") or {}).get(kind) if kind else None) for e in listed.entries}
        summary = deletions.apply(ctx, name, present, listed, set(), act=True)
        others = sorted(p for p in present if p not in deletions.files)
        if not others and not summary["changed_at_destination"]:
            summary["dirs_removed"] += remove_empty_dirs(cfg, rclone, "", [name])
        record_deletions(records, layout, cfg, gen, name, stem, summary)
        if others:
            log.warning("folder %r is no longer at SOURCE; %d files in it at DESTINATION were never ours and "
                        "stay (first: %r)", name, len(others), others[0])
        return {"folder": name, "stem": stem, "destination": "removed" if name in summary["dirs_removed"] else "kept",
                "extra": others, "deleted_at_source": summary}


def finish_folder(ctx: Run, gen: int, folder: FolderEntry, larges_done: set[str], dest_features: dict, *,
                  repaired: bool = False, deletions: Deletions | None = None) -> dict:
    """Recreate empty directories and verify a folder whose parts are all restored; with
    ``deletions``, handle the copies of files deleted at SOURCE too."""
    cfg, records, layout, rclone = ctx.cfg, ctx.records, ctx.layout, ctx.rclone
    name, stem = folder.name, folder.stem
    with log_context(folder=name):
        _header, index = load_manifest(records, layout.manifest(gen, stem),
                                       os.path.join(cfg.tmp_dir, local_name(stem, f"g{gen}", "verify.sqlite")))
        try:
            waiting = [r["path"] for r in index.rows("l")
                       if large_file_id(r["path"], r["size"], r["mtime"]) not in larges_done]
            if waiting:
                log.info("%d large files are not copied yet (first: %r)", len(waiting), waiting[0])
                return {"state": "waiting", "large_waiting": waiting}
            create_dirs(cfg, rclone, name, stem, index)
            if deletions is not None:
                deletions.load(records, index)
            report = verify_folder(ctx, name, stem, index, dest_features, deletions)
        finally:
            index.close()
        report["state"] = "verified" if report["ok"] else "failed"
        if report["ok"]:
            if repaired:
                records.delete(layout.repair(gen, stem))
                log.info("repaired: every damaged file restored and verified")
            if deletions is not None and cfg.propagate_deletes:
                record_deletions(records, layout, cfg, gen, name, stem, report["deleted_at_source"])
            records.put_json_once(layout.verified_record(gen, stem), VerifiedRecord(
                folder=name, generation=gen, verified_at=utc_now(), extra=len(report["extra"]),
                **{k: report[k] for k in ("files", "bytes", "matched_by_hash", "matched_by_size", "hash_kind",
                                          "compared", "not_kept", "read_back")}).to_json())
            if name:
                records.put_json(layout.legacy_progress(stem, "unzipper"), {
                    "processed_keys": [layout.part_object(stem, p["name"]) for p in folder.part_table or []],
                    "folder_complete": True, "updated_at": utc_now()})
            log.info("verified: %s match (%d by %s, %d by size only)%s", count(report["files"], "file"),
                     report["matched_by_hash"], report["hash_kind"] or "hash", report["matched_by_size"],
                     f"; {len(report['extra'])} extra files at DESTINATION" if report["extra"] else "")
        else:
            for path in report["missing"][:50]:
                why = report["left_out"].get(path)
                log.error("missing at DESTINATION: %r%s", path, f" (the zipper left it out: {why})" if why else "")
            for d in report["differing"][:50]:
                log.error("differs at DESTINATION: %r: %s", d["path"], d["why"])
            log.error("verification failed: %d missing, %d differing", len(report["missing"]),
                      len(report["differing"]))
        return report


# The run

class Finisher:
    """Verifies each folder as soon as its last part is restored, in the worker that restored
    it, while other workers go on restoring: verification overlaps the transfers."""

    def __init__(self, verify: Callable[[FolderEntry], Any]):
        self.verify = verify
        self.left: dict[str, int] = {}
        self.failed: set[str] = set()
        self.lock = threading.Lock()

    def expect(self, stem: str, parts: int) -> None:
        with self.lock:
            self.left[stem] = parts

    def part_done(self, folder: FolderEntry, ok: bool) -> dict | BaseException | None:
        """Count a part of the folder; after its last one, verify the folder when every part
        succeeded. Returns the verification's report or exception, or None."""
        stem = folder.stem
        with self.lock:
            self.left[stem] -= 1
            if not ok:
                self.failed.add(stem)
            last = self.left[stem] == 0 and stem not in self.failed
        if not last:
            return None
        return self.finish(folder)

    def finish(self, folder: FolderEntry) -> Any:
        try:
            return self.verify(folder)
        except Exception as exc:  # reported with the folder; the part itself stays restored
            return exc


class Restoring:
    """The unzipper's units of one map generation, planned afresh for each pass from a fresh
    listing of the records (the first pass uses the listing made at start): per pending folder,
    one unit per part to restore (for a folder under repair, only the parts holding damaged
    files, and only those files) and, for a folder with nothing left to restore, its
    verification. A folder whose every part is zipped is verified by the worker that restores
    its last part (``Finisher``), so verification overlaps the transfers."""

    def __init__(self, ctx: Run, gen: int, index: IndexRecord, folders: list[FolderEntry], passes: Passes,
                 view: MapView | None = None):
        records, layout = ctx.records, ctx.layout
        self.ctx, self.gen, self.index, self.folders, self.passes = ctx, gen, index, folders, passes
        self.view = view  # unfinished while the mapper maps this (first) generation: see _grow
        # Files deleted at SOURCE, per folder stem, over every generation; with PROPAGATE_DELETES=1
        # a folder with deletions is pending until they are handled for this generation.
        self.sources = deletion_sources(records, layout, gen)
        self.deleted_done = {layout.stem_of(k["Key"]) for k in records.list_keys(layout.deletions_of(gen))}
        self.local = local_destination(ctx.cfg, folders if view is None or view.complete else [
            FolderEntry(name=f["name"], stem=f["stem"]) for f in view.plan.folders])
        self.dest_features: dict = {}
        self.verified_now: dict[str, Any] = {}
        self.failed_parts: dict[str, list] = {}
        self.problems: list[tuple[str, str]] = []
        self.refresh()
        self.pending = [f for f in folders if f.stem not in self.verified or f.stem in self.repairs
                        or self.to_delete(f.stem)]
        self.pending_stems = {f.stem for f in self.pending}
        latest_stems = {f.stem for f in index.folders}
        self.removed = sorted({(src[-1]["name"], stem) for stem, src in self.sources.items()
                               if stem not in latest_stems and ctx.in_shard(src[-1]["name"])})
        self.finisher = Finisher(self.verify)

    def refresh(self) -> None:
        records, layout = self.ctx.records, self.ctx.layout
        self.zipped = records.record_names(layout.parts_root)
        self.larges = records.record_names(layout.large_root)
        self.restored = records.record_names(layout.restored_root)
        self.verified = {layout.stem_of(k["Key"]) for k in records.list_keys(layout.verified_of(self.gen))}
        self.repairs = list_repairs(records, layout, self.gen)
        self._fresh = True

    def _grow(self) -> None:
        """The folders mapped since the last pass, while the mapper maps this first generation."""
        if self.view is None or self.view.complete and self.index is self.view.index:
            return
        self.view.refresh()
        self.index = self.view.as_index()
        known = {f.stem for f in self.folders}
        new = [f for f in self.index.folders if f.stem not in known and self.ctx.in_shard(f.name)]
        self.folders += new
        self.pending += [f for f in new if f.stem not in self.verified or f.stem in self.repairs]
        self.pending_stems |= {f.stem for f in new}

    @property
    def map_complete(self) -> bool:
        return self.view is None or self.view.complete

    def waiting_for_zipper(self) -> bool:
        """Some folder still to restore has parts not zipped, or large files not copied, yet."""
        for f in self.pending:
            zipped = self.zipped.get(f.stem, set())
            if any(p not in zipped for p in f.part_names) or f.large > len(self.larges.get(f.stem, set())):
                return True
        return False

    def to_delete(self, stem: str) -> bool:
        return self.ctx.cfg.propagate_deletes and stem in self.sources and stem not in self.deleted_done

    def units(self) -> Iterator[Unit]:
        if not self._fresh:  # a pass before this one: look at the records again
            self.refresh()
            self.pending = [f for f in self.pending if f.stem not in self.verified or f.stem in self.repairs]
            self._grow()
            self.problems = [p for p in self.problems if not p[0].startswith("folder ")]
        self._fresh = False
        self.finisher = Finisher(self.verify)
        for folder in self.pending:
            yield from self._folder_units(folder)

    def _failed(self, stem: str, part: str) -> bool:
        return (SCRIPT, stem, part) in self.passes.failed

    def _folder_units(self, folder: FolderEntry) -> Iterator[Unit]:
        name, stem = folder.name, folder.stem
        table = [p["name"] for p in folder.part_table or []]
        zipped, restored = self.zipped.get(stem, set()), self.restored.get(stem, set())
        # A part that failed in this run: the folder cannot be verified now.
        all_zipped = all(p in zipped for p in table) and not any(self._failed(stem, p) for p in table)
        todo = [p for p in table if p in zipped and p not in restored and not self._failed(stem, p)]
        jobs = self._jobs(folder, todo) if todo or stem in self.repairs else []
        if jobs is None:  # the manifest could not be read
            return
        if not jobs:
            if all_zipped:
                yield self._verify_unit(folder)
            return
        self.finisher.expect(stem, len(jobs) if all_zipped else len(jobs) + 1)  # + 1: never verified now
        for job in jobs:
            yield Unit(SCRIPT, "part", name, stem, job.part, f"part {job.part} of folder {name!r}",
                       functools.partial(restore_part, self.ctx, job),
                       () if job.repair else (self.ctx.layout.restored_record(stem, job.part),),
                       after=functools.partial(self._after_restore, self.finisher, folder, job))

    def _jobs(self, folder: FolderEntry, todo: list[str]) -> list[RestoreJob] | None:
        """The restore jobs of a folder, from its manifest; None (reported) when it cannot be read."""
        ctx, name, stem, gen = self.ctx, folder.name, folder.stem, self.gen
        try:
            _header, index = load_manifest(ctx.records, ctx.layout.manifest(gen, stem),
                                           os.path.join(ctx.cfg.tmp_dir, local_name(stem, f"g{gen}", "sqlite")))
        except Exception as exc:
            self.problems.append((f"folder {name!r}", str(exc)))
            log.error("folder %r: %s", name, exc)
            return None
        try:
            repair = self.repairs.get(stem)
            damaged = self._damaged(folder, index, repair) if repair else {}
            jobs = []
            for part in sorted(set(todo) | set(damaged)) if repair else todo:
                if repair and part in damaged and part in self.restored.get(stem, set()):
                    keep, force = damaged[part], True
                else:
                    keep, force = {r["path"]: r for r in index.rows("f", part)}, False
                jobs.append(RestoreJob(folder=name, stem=stem, part=part, gen=gen, keep=keep, repair=force,
                                       local=self.local))
            return jobs
        finally:
            index.close()

    def _damaged(self, folder: FolderEntry, index: FolderIndex, repair: dict) -> dict[str, dict[str, dict]]:
        """{part: {path: row}} of the damaged files a repair restores again from zipped parts."""
        records, layout, stem = self.ctx.records, self.ctx.layout, folder.stem
        damaged: dict[str, dict[str, dict]] = {}
        for path in repair["paths"]:
            row = index.get(path)
            if row is None:
                continue
            if row["kind"] == "l":
                # --verify deleted the copy record before it wrote the repair; a repair written by an
                # older version that left it is handled here, once: a record older than the repair is
                # the damaged copy, a newer one is the new copy.
                if repair.get("large_records_deleted"):
                    continue
                large_key = layout.large_record(stem, large_file_id(row["path"], row["size"], row["mtime"]))
                head = records.head(large_key)
                if head is not None and head["LastModified"] < repair["listed_at"]:
                    log.warning("large file %r is damaged at DESTINATION; python_zipper.py will copy it again", path)
                    records.delete(large_key)
            elif row["kind"] == "f" and row["part"] in self.zipped.get(stem, set()):
                damaged.setdefault(row["part"], {})[path] = row
        return damaged

    @staticmethod
    def _after_restore(finisher: "Finisher", folder: FolderEntry, job: RestoreJob, result: Any) -> Any:
        """Count the part for its folder's verification (run by this worker after the last one)."""
        if isinstance(result, BaseException) or (isinstance(result, Skipped) and result.why != "done"):
            finisher.part_done(folder, False)  # failed, or another worker has it: verified in a later pass
            return result
        if isinstance(result, Skipped):  # restored by another worker meanwhile
            result = {"stem": job.stem, "part": job.part, "folder": job.folder, "by_another_worker": True}
        result["verification"] = finisher.part_done(folder, True)
        return result

    # A folder's verification, under its "verify" claim
    def _verify_done_keys(self, stem: str) -> tuple[str, ...]:
        if stem in self.repairs:
            return ()
        layout = self.ctx.layout
        return (layout.verified_record(self.gen, stem),) + (
            (layout.deletions(self.gen, stem),) if self.to_delete(stem) else ())

    def _verify_unit(self, folder: FolderEntry) -> Unit:
        name, stem = folder.name, folder.stem
        return Unit("verify", "folder", name, stem, "folder", f"verification of {name!r}",
                    functools.partial(self.check, folder), self._verify_done_keys(stem))

    def verify(self, folder: FolderEntry) -> Any:
        """The folder's verification right after its last part, in the worker that restored it."""
        keys = self._verify_done_keys(folder.stem)
        return self.passes.claims("verify").run(folder.stem, "folder", functools.partial(self.check, folder),
                                                done=functools.partial(self.ctx.exists, *keys) if keys
                                                else (lambda: False))

    def check(self, folder: FolderEntry) -> dict:
        ctx, stem = self.ctx, folder.stem
        previous = unchanged_since(folder, self.index)
        if previous is not None and stem not in self.repairs and not self.to_delete(stem):
            carried = carry_verification(ctx.records, ctx.layout, self.gen, folder, previous)
            if carried is not None:
                return carried
        # A repair deletes the copy records of damaged large files before its restores start.
        done = ctx.records.record_names(ctx.layout.large_root) if stem in self.repairs else self.larges
        return finish_folder(ctx, self.gen, folder, done.get(stem, set()), self.dest_features,
                             repaired=stem in self.repairs,
                             deletions=Deletions(stem, self.sources[stem]) if stem in self.sources else None)

    @staticmethod
    def progressed(result: Any) -> bool:
        """A part restored, or a folder verified: not a verification still waiting for the zipper
        (which a pass while following the zipper yields again and again)."""
        if isinstance(result, (Skipped, BaseException)):
            return False
        return not (isinstance(result, dict) and result.get("state") == "waiting")

    def held(self, result: Any) -> Skipped | None:
        """A unit held by another worker, or a part whose folder's verification is."""
        for r in (result, result.get("verification") if isinstance(result, dict) else None):
            if isinstance(r, Skipped) and r.why != "done":
                return r
        return None

    def take(self, outcomes: list[tuple[Unit, Any]], plan_errors: list) -> None:
        """Note each outcome: parts restored or failed, folders verified (or why not)."""
        self.problems += [("listing of parts", str(e)) for e in plan_errors]
        for unit, result in outcomes:
            if isinstance(result, StopRequested):
                continue
            verification = result
            if unit.kind == "part" and isinstance(result, dict):
                self.restored.setdefault(result["stem"], set()).add(result["part"])
                verification = result.get("verification")
            elif unit.kind == "part" and isinstance(result, Exception):
                self.problems.append((unit.what, str(result)))
                log.error("%s failed: %s", unit.what, result)
                self.failed_parts.setdefault(unit.folder, []).append(unit.name)
                continue
            if verification is not None and not isinstance(verification, Skipped):
                self.verified_now[unit.folder] = verification  # a folder's report, or why it was not verified


def folder_state(folder: FolderEntry, zipped: dict, restored: dict, failed_parts: dict) -> tuple[str, dict]:
    """Where a folder stands before its verification: (state, details)."""
    stem = folder.stem
    parts = [p["name"] for p in folder.part_table or []]
    not_zipped = [p for p in parts if p not in zipped.get(stem, set())]
    not_restored = [p for p in parts if p not in restored.get(stem, set())]
    if folder.name in failed_parts or set(not_restored) - set(not_zipped):
        return "failed", {"parts_failed": failed_parts.get(folder.name, sorted(set(not_restored) - set(not_zipped)))}
    if not_zipped:
        return "waiting", {"parts_waiting": not_zipped}
    return "ready", {}


def write_report(cfg: Config, records: Records, layout: Layout, report: dict) -> str:
    run_id = report["run_id"]
    os.makedirs(os.path.join(cfg.work_dir, "reports"), exist_ok=True)
    body = json.dumps(report, ensure_ascii=False, indent=1, sort_keys=True)
    path = os.path.join(cfg.work_dir, "reports", f"{run_id}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(body)
    os.replace(path + ".tmp", path)
    shutil.copyfile(path, os.path.join(cfg.work_dir, "reports", "latest.json"))
    if not cfg.dry_run:
        records.put_bytes(layout.report(run_id), body.encode("utf-8"), content_type="application/json")
    return path


def print_report(report: dict) -> None:
    rows = [("folder", "state", "files", "by hash", "by size", "missing", "differ", "extra", "compared")]
    for f in report["folders"]:
        rows.append((f["folder"] or ROOT_LABEL, f["state"], str(f.get("files", "")),
                     str(f.get("matched_by_hash", "")), str(f.get("matched_by_size", "")),
                     str(len(f.get("missing", [])) if isinstance(f.get("missing"), list) else ""),
                     str(len(f.get("differing", [])) if isinstance(f.get("differing"), list) else ""),
                     str(len(f.get("extra", [])) if isinstance(f.get("extra"), list) else ""),
                     "+".join(f["compared"]) + (" (read back)" if f.get("read_back") and f.get("hash_kind") != "crc32"
                                                else "") if isinstance(f.get("compared"), list) else ""))
    for line in table_lines(rows, max_width=40):
        out.info(line + "\n")
    t = report["totals"]
    out.info(f"\n{t['verified']} of {t['folders']} folders verified, {t['waiting']} waiting for the "
                     f"zipper, {t['failed']} failed; {t['files_verified']} files verified\n")


def list_repairs(records: Records, layout: Layout, gen: int) -> dict[str, dict]:
    """Folders that ``--verify`` found damaged: {stem: {"paths": [...]}}."""
    out = {}
    for item in records.list_keys(layout.repair_of(gen)):
        stem = layout.stem_of(item["Key"])
        marker = records.get_json(item["Key"])
        if not isinstance(marker, dict) or not isinstance(marker.get("paths"), list):
            raise RecordError(item["Key"], "not a repair record")
        out[stem] = {**marker, "listed_at": item["LastModified"]}
    return out


def check_folder(ctx: Run, gen: int, folder: FolderEntry, dest_features: dict) -> dict:
    """``--verify`` of one folder: DESTINATION against its manifest, slow hashes included."""
    name, stem = folder.name, folder.stem
    with log_context(folder=name):
        _header, index = load_manifest(ctx.records, ctx.layout.manifest(gen, stem),
                                       os.path.join(ctx.cfg.tmp_dir, local_name(stem, f"g{gen}", "check.sqlite")))
        try:
            return verify_folder(ctx, name, stem, index, dest_features, thorough=True)
        finally:
            index.close()


def verify_only(ctx: Run, gen: int, folders: list[FolderEntry]) -> int:
    """``--verify``: compare DESTINATION with the map, transfer nothing, print every problem."""
    cfg, runtime = ctx.cfg, ctx.runtime
    dest_features = ctx.rclone.features(destination_root(cfg)) if local_destination(cfg, folders) is None else {}
    results = WorkerPool(cfg.max_parallel_workers, runtime).run(
        [(f, functools.partial(check_folder, ctx, gen, f, dest_features)) for f in folders])
    runtime.check()
    report_folders, problems, unmade = mark_repairs(ctx, gen, results)
    return conclude_check(ctx, gen, report_folders, problems, unmade)


def mark_repairs(ctx: Run, gen: int, results: list[tuple[FolderEntry, Any]]) -> tuple[list[dict], int, int]:
    """Print every problem found; write each damaged folder's repair record (its damaged large
    files' copy records deleted first) and delete those of folders found whole. Returns the
    report's folders, the folders with problems, and those not zipped in full yet."""
    cfg, records, layout = ctx.cfg, ctx.records, ctx.layout
    repairs = list_repairs(records, layout, gen)
    report_folders, problems, unmade = [], 0, 0
    for folder, result in results:
        if isinstance(result, Exception):
            log.error("folder %r could not be checked: %s", folder.name, result)
            report_folders.append({"folder": folder.name, "stem": folder.stem, "state": "failed",
                                   "error": str(result)})
            problems += 1
            unmade += isinstance(result, PartNotMade)
            continue
        result["state"] = "verified" if result["ok"] else "failed"
        report_folders.append(result)
        prefix = folder.name + "/" if folder.name else ""
        for path in result["missing"]:
            why = result["left_out"].get(path)
            out.info(f"missing  {prefix}{path}" + (f"  (the zipper left it out: {why})" if why else "") + "\n")
        for d in result["differing"]:
            out.info(f"differs  {prefix}{d['path']}  ({d['why']})\n")
        for path in result["extra"]:
            out.info(f"extra    {prefix}{path}\n")
        damaged = result["missing"] + [d["path"] for d in result["differing"]]
        marker = layout.repair(gen, folder.stem)
        if damaged:
            problems += 1
        if damaged and not cfg.dry_run:
            # A damaged large file is copied again by the zipper's next run: its copy record goes
            # first, so that the repair record, once written, can say so.
            for row in result["large_damaged"]:
                file_id = large_file_id(row["path"], row["size"], row["mtime"])
                records.delete(layout.large_record(folder.stem, file_id))
                log.warning("large file %r is damaged at DESTINATION; python_zipper.py will copy it again",
                            prefix + row["path"])
            records.put_json(marker, {"folder": folder.name, "generation": gen, "paths": damaged,
                                      "found_at": utc_now(), "worker": cfg.worker_id,
                                      "large_records_deleted": True})
        elif not damaged and folder.stem in repairs and not cfg.dry_run:
            records.delete(marker)  # what an earlier --verify found is repaired: nothing is pending
            log.info("folder %r: the repair found by an earlier --verify is done", folder.name)
    return report_folders, problems, unmade


def conclude_check(ctx: Run, gen: int, report_folders: list[dict], problems: int, unmade: int) -> int:
    """``--verify``'s report (local, S3, stdout), its proof, and its exit code."""
    cfg, records, layout = ctx.cfg, ctx.records, ctx.layout
    report = make_report(cfg, gen, report_folders, [], mode="verify")
    path = write_report(cfg, records, layout, report)
    print_report(report)
    tell_proof(records, layout, report["proof"])
    log.info("report written to %s and s3://%s/%s", path, cfg.bucket, layout.report(report["run_id"]))
    if unmade:
        log.error("%d folders are not zipped in full yet; run python_zipper.py, then python_unzipper.py", unmade)
    if problems > unmade:
        log.error("%d folders do not match the map; run python_zipper.py (for large files) and "
                  "python_unzipper.py to repair them (only the damaged files are copied again)", problems - unmade)
    if problems:
        return EXIT_PARTIAL
    log.info("DESTINATION matches the map: %d files in %d folders (compared: %s)",
             report["totals"]["files_verified"], len(report_folders),
             "; ".join(" + ".join(c["by"]) for c in (report["proof"] or {}).get("compared") or []) or "nothing")
    return EXIT_OK


def proof_summary(cfg: Config, report_folders: list[dict]) -> dict | None:
    """What this run's verifications compared, grouped ({by: [size, md5, mtime], folders: n}),
    what DESTINATION cannot keep and whether files were read back; None when nothing was compared."""
    checked = [f for f in report_folders if isinstance(f.get("compared"), list)]
    if not checked:
        return None
    groups: dict[tuple, int] = {}
    for f in checked:
        groups[tuple(f["compared"])] = groups.get(tuple(f["compared"]), 0) + 1
    return {"at": utc_now(), "destination": destination_root(cfg),
            "compared": [{"by": list(k), "folders": n} for k, n in sorted(groups.items())],
            "not_kept": sorted({k for f in checked for k in f.get("not_kept") or []}),
            "read_back": all(f.get("read_back") for f in checked),
            "slow_hash_skipped": any(f.get("slow_hash_skipped") for f in checked)}


def tell_proof(records: Records, layout: Layout, proof: dict | None) -> None:
    """Say once, plainly, what the verification compared and what it could not; keep it for --status."""
    if proof is None:
        return
    out.info(describe_proof(proof) + "\n")
    for line in proof_warnings(proof):
        log.warning("%s", line)
    if not records.cfg.dry_run:
        records.put_json(layout.proof, proof)


def make_report(cfg: Config, gen: int, report_folders: list[dict], errors: list, *, mode: str) -> dict:
    counts = {s: sum(1 for f in report_folders if f["state"] == s) for s in ("verified", "waiting", "failed")}
    return {"run_id": new_run_id(SCRIPT), "mode": mode, "generation": gen, "proof": proof_summary(cfg, report_folders),
            "destination": destination_root(cfg), "folders": report_folders,
            "totals": {"folders": len(report_folders), **counts,
                       "files_verified": sum(f.get("files", 0) for f in report_folders
                                             if f["state"] == "verified"),
                       "matched_by_hash": sum(f.get("matched_by_hash", 0) for f in report_folders),
                       "matched_by_size": sum(f.get("matched_by_size", 0) for f in report_folders)},
            "errors": [{"what": w, "error": e} for w, e in errors]}


# Buckets written by the original scripts (no map of ours)

_LEGACY_PART = re.compile(r"(Full|Part(\d+))(?:_Split(\d+))?\.zip")


def _natural_key(part: str) -> tuple:
    m = _LEGACY_PART.fullmatch(part)
    assert m
    return (0 if m.group(1) == "Full" else 1, int(m.group(2) or 0), int(m.group(3) or 0))


def legacy_parts(records: Records, prefix: str, folders: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Part keys of each folder, by the original naming rule and never by a bare prefix.

    ``P<s(F)>_<Full|PartN>.zip`` belongs to F. A split key was built by deleting every
    ``.zip`` from the base key, so ``<base without .zip>_SplitM.zip``; when two folders could
    have made the same split key, it is reported as ambiguous and restored nowhere.
    Returns ({folder: [part keys in the original order]}, [ambiguous keys]).
    """
    stems = {f: sanitize_name(f) for f in folders}
    base_owner: dict[str, str] = {}
    split_owner: dict[str, set[str]] = {}
    for folder, stem in stems.items():
        base_owner[f"{prefix}{stem}_"] = folder
        split_owner.setdefault(f"{prefix}{stem}_".replace(".zip", ""), set()).add(folder)
    out: dict[str, list[str]] = {f: [] for f in folders}
    ambiguous = []
    for item in records.list_keys(prefix):
        key = item["Key"]
        if not key.endswith(".zip"):
            continue
        for head, folder in base_owner.items():
            rest = key[len(head):]
            if key.startswith(head) and _LEGACY_PART.fullmatch(rest) and "_Split" not in rest:
                out[folder].append((_natural_key(rest), key))
        for head, owners in split_owner.items():
            rest = key[len(head):]
            m = _LEGACY_PART.fullmatch(rest) if key.startswith(head) else None
            if m and m.group(3):
                if len(owners) > 1:
                    ambiguous.append(key)
                else:
                    out[next(iter(owners))].append((_natural_key(rest), key))
    return {f: [k for _n, k in sorted(set(v))] for f, v in out.items()}, sorted(set(ambiguous))


def _zip_mtime(info: zipfile.ZipInfo) -> float:
    """An entry's mtime: Info-ZIP's extended timestamp (UTC) when present, else the DOS field."""
    extra = info.extra
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[i:i + 4])
        if tag == 0x5455 and size >= 5 and extra[i + 4] & 1:
            return float(struct.unpack("<i", extra[i + 5:i + 9])[0])
        i += 4 + size
    return time.mktime(info.date_time + (0, 0, -1))


def restore_legacy_part(ctx: Run, folder: str, key: str, listed: set[str]) -> dict:
    """Download one original part (a temporary file of at most one part), test every CRC,
    refuse unsafe names and zip bombs, extract with mtimes, upload to DESTINATION/<folder>."""
    cfg, records, rclone, runtime = ctx.cfg, ctx.records, ctx.rclone, ctx.runtime
    gate = ctx.gate if ctx.gate is not None else DiskGate(cfg, runtime)
    head = records.head(key)
    if head is None:
        raise PartDamaged(key, "it disappeared from the bucket")
    size = head["ContentLength"]
    name = local_name(sanitize_name(folder), os.path.basename(key))
    archive = os.path.join(cfg.tmp_dir, name + ".zip")
    staging = os.path.join(cfg.tmp_dir, name)
    with runtime.progress.unit(os.path.basename(key), folder, size), log_context(folder=folder,
                                                                               part=os.path.basename(key)):
        with gate.reserve(2 * size + MIB, f"part {os.path.basename(key)}"), staging_dir(staging, f"part {key}"):
            try:
                records.download(key, archive)
                try:
                    zf = zipfile.ZipFile(archive)
                except zipfile.BadZipFile as exc:
                    raise PartDamaged(key, f"not a zip file: {exc}") from None
                with zf:
                    infos = zf.infolist()
                    for info in infos:
                        reason = unsafe_reason(info.filename.rstrip("/"))
                        if reason:
                            raise PartDamaged(key, f"entry {info.filename!r} has {reason}")
                    claimed = sum(i.file_size for i in infos)
                    if size and claimed > cfg.max_zip_bomb_ratio * size:
                        raise PartDamaged(key, f"entries claim {claimed} bytes, over MAX_ZIP_BOMB_RATIO="
                                               f"{cfg.max_zip_bomb_ratio:g} times the part's {size}")
                    bad = zf.testzip()
                    if bad is not None:
                        raise PartDamaged(key, f"entry {bad!r} fails its CRC check")
                    written = skipped = 0
                    for info in infos:
                        runtime.check()
                        target = os.path.join(staging, info.filename)
                        if info.is_dir():
                            os.makedirs(target, exist_ok=True)
                            continue
                        if re.search(r"\.[A-Za-z0-9]{8}\.partial$", info.filename) and info.filename not in listed:
                            log.warning("skipping %r: a partial download the original zipper packed", info.filename)
                            skipped += 1
                            continue
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, MIB)
                        mtime = _zip_mtime(info)
                        os.utime(target, (mtime, mtime))
                        written += 1
                os.remove(archive)
                upload_staging(cfg, rclone, staging, folder, f"upload of {os.path.basename(key)}", size,
                               ["--create-empty-src-dirs"])
            finally:
                if os.path.exists(archive):
                    os.remove(archive)
        log.info("original part restored: %d files (%d partial downloads skipped)", written, skipped)
        return {"key": key, "etag": head.get("ETag", "").strip('"'), "files": written, "restored_at": utc_now()}


def read_legacy_folder(records: Records, layout: Layout, stem: str) -> tuple[set[str], dict[str, int], bool] | None:
    """An original folder's ``_List.txt`` paths, ``_LargeFiles.json`` sizes, and whether the original
    zipper marked it complete; None without a list (the original mapper has not mapped it)."""
    list_raw = records.get_bytes(layout.list_txt(stem))
    if list_raw is None:
        return None
    try:
        listed = {p for p in list_raw.decode("utf-8").split("\n") if p}
    except UnicodeDecodeError as exc:
        raise RecordError(layout.list_txt(stem), f"not UTF-8 text: {exc}") from None
    large_raw = records.get_bytes(layout.large_json(stem))
    larges: dict[str, int] = {}
    if large_raw is not None:
        try:
            larges = {d["path"]: int(d["size"]) for d in json.loads(large_raw)}
        except (ValueError, TypeError, KeyError) as exc:
            raise RecordError(layout.large_json(stem), f"not a list of {{path, size}}: {exc}") from None
    progress = records.get_json(layout.legacy_progress(stem, "zipper"))
    if progress is not None and not isinstance(progress, dict):
        raise RecordError(layout.legacy_progress(stem, "zipper"), "not a JSON object")
    return listed, larges, bool(progress and progress.get("folder_complete"))


def restore_legacy_parts(ctx: Run, folder: str, keys: list[str], listed: set[str], done: set[str],
                         entry: dict, errors: list) -> None:
    """Restore the original parts of a folder that no record says were restored (a record per
    key and ETag, so a part replaced on S3 is restored again); failures go into ``errors``."""
    records, layout, stem = ctx.records, ctx.layout, sanitize_name(folder)
    for key in keys:
        head = records.head(key)
        if head is None:
            continue
        etag = head["ETag"].strip('"')
        record_name = hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest()[:32]
        if record_name in done:
            continue
        try:
            result = restore_legacy_part(ctx, folder, key, listed)
        except (MigrationError, OSError) as exc:
            log.error("%s", exc)
            errors.append((key, str(exc)))
            entry["state"] = "failed"
            continue
        records.put_json_once(layout.legacy_restored(stem, record_name), result)


def run_legacy(ctx: Run, verify: bool) -> int:
    """Restore and verify a bucket the original scripts wrote: ``folder_list.txt``, ``_List.txt``,
    ``_Full``/``_PartN``/``_SplitM`` parts and their progress JSON; no map of ours."""
    cfg, records, layout, rclone, runtime = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime
    raw = records.get_bytes(layout.folder_list)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(layout.folder_list, f"not UTF-8 text: {exc}") from None
    folders = [line for line in text.split("\n") if line.strip()]
    log.info("bucket written by the original scripts: %d folders in %s", len(folders), layout.folder_list)
    stems: dict[str, list[str]] = {}
    for f in folders:
        stems.setdefault(sanitize_name(f), []).append(f)
    parts, ambiguous = legacy_parts(records, cfg.prefix, folders)
    for key in ambiguous:
        log.error("part %r could belong to several folders (the original split naming); it was not restored",
                  key)
    done = records.record_names(layout.legacy_restored_root)
    dest_features = rclone.features(destination_root(cfg))
    entries = []
    errors: list[tuple[str, str]] = [(k, "ambiguous part") for k in ambiguous]
    for folder in folders:
        runtime.check()
        stem = sanitize_name(folder)
        entry: dict[str, Any] = {"folder": folder, "stem": stem}
        entries.append(entry)
        if len(stems[stem]) > 1:
            msg = f"folders {stems[stem]!r} share the key stem {stem!r} in the original layout; their keys are mixed"
            log.error("%s: not restored", msg)
            entry.update(state="failed", error=msg)
            errors.append((folder, msg))
            continue
        legacy = read_legacy_folder(records, layout, stem)
        if legacy is None:
            entry.update(state="waiting", error="no _List.txt: the original mapper has not mapped it")
            continue
        listed, larges, zipper_done = legacy
        if not verify:
            restore_legacy_parts(ctx, folder, parts[folder], listed, done.get(stem, set()), entry, errors)
        if entry.get("state") == "failed":
            continue
        report = verify_legacy(cfg, rclone, folder, listed, larges, dest_features)
        entry.update(report)
        if not zipper_done and not verify:
            entry["state"] = "waiting"
            entry["why"] = "the original zipper has not marked this folder complete"
        else:
            entry["state"] = "verified" if report["ok"] else "failed"
    report = make_report(cfg, 0, entries, errors, mode="legacy-verify" if verify else "legacy")
    path = write_report(cfg, records, layout, report)
    print_report(report)
    log.info("report written to %s", path)
    t = report["totals"]
    if t["failed"] or errors:
        return EXIT_PARTIAL
    if t["waiting"]:
        log.warning("%d folders are not complete in the original zipper's progress; run again later", t["waiting"])
        return EXIT_WAITING
    return EXIT_OK


def verify_legacy(cfg: Config, rclone: Rclone, folder: str, listed: set[str], larges: dict[str, int],
                  dest_features: dict) -> dict:
    """Compare DESTINATION/<folder> with ``_List.txt`` (paths) and ``_LargeFiles.json`` (sizes)."""
    dest = remote_join(destination_root(cfg), folder)
    try:
        found = {e["Path"]: int(e.get("Size", -1)) for e in rclone.lsjson(
            dest, ["-R", "--files-only", "--no-mimetype"], what=f"listing of {dest!r}")}
    except MigrationError as exc:
        if getattr(exc, "returncode", None) == 3:
            found = {}
        else:
            raise
    missing = sorted(p for p in listed | set(larges) if p not in found)
    differing = [{"path": p, "why": f"size {found[p]} != {s}"} for p, s in sorted(larges.items())
                 if p in found and found[p] != s]
    extra = sorted(p for p in found if p not in listed and p not in larges)
    for p in missing[:50]:
        log.error("missing at DESTINATION: %r", p)
    return {"files": len(listed) + len(larges), "matched_by_hash": 0,
            "matched_by_size": len(larges) - len(differing) - sum(1 for p in larges if p not in found),
            "listed_present": len(listed) - sum(1 for p in listed if p not in found),
            "missing": missing, "differing": differing, "extra": extra,
            "ok": not missing and not differing}


def print_plan(ctx: Run, work: Restoring, to_restore: list[tuple[dict, dict]]) -> None:
    """DRY_RUN: the parts to restore, the folders to verify and those waiting for the zipper."""
    out.info(f"plan for map generation {work.gen} (DRY_RUN: nothing is downloaded or uploaded)\n")
    for f, p in to_restore:
        out.info(f"restore part {f.name or ROOT_LABEL}/{p['name']}: {p['files']} files, "
                 f"{human_bytes(p['bytes'])} -> {destination_root(ctx.cfg)}\n")
    waiting = 0
    for f in work.pending:
        table = [p["name"] for p in f.part_table or []]
        unzipped = [p for p in table if p not in work.zipped.get(f.stem, set())]
        large_left = max(0, int(f.large) - len(work.larges.get(f.stem, set())))
        label = f.name or ROOT_LABEL
        if unzipped or large_left:
            waiting += 1
            out.info(f"wait for the zipper: folder {label}: {len(table) - len(unzipped)} of "
                     f"{count(len(table), 'part')} zipped, {count(large_left, 'large file')} not copied yet\n")
        else:
            out.info(f"verify folder {label}: {count(f.files + f.large, 'file')}"
                     + (" (repair)" if f.stem in work.repairs else "") + "\n")
    restore = count(len(to_restore), 'part')
    if waiting:
        out.info(f"{restore} to restore, {count(len(work.pending) - waiting, 'folder')} to verify, "
                 f"{count(waiting, 'folder')} waiting for the zipper (the real run would exit 4 for those)\n")
    else:
        out.info(f"{restore} to restore, {count(len(work.pending), 'folder')} to verify\n")


def announce(ctx: Run, work: Restoring) -> list[tuple[dict, dict]]:
    """Say what this run has to do, guard the deletions it would make, plan the progress
    display; return the parts to restore."""
    cfg, folders, sources = ctx.cfg, work.folders, work.sources
    log.info("map generation %d: %d folders, %d verified, %d to repair%s", work.gen, len(folders),
             len(folders) - len(work.pending), len(work.repairs),
             f"; deletions at SOURCE in {len(sources)} folders ({len(work.removed)} removed folders), "
             + ("PROPAGATE_DELETES=1: copies still as restored are deleted" if cfg.propagate_deletes
                else "kept at DESTINATION (PROPAGATE_DELETES=0)") if sources else "")
    doomed = planned_deletions(ctx.records, ctx.layout, work.gen, work.index, sources, work.deleted_done,
                               work.removed) if cfg.propagate_deletes else {}
    guard_deletions(cfg, ctx.records, ctx.layout, work.index, doomed)
    to_restore = [(f, p) for f in work.pending for p in f.part_table or []
                  if p["name"] in work.zipped.get(f.stem, set())
                  and p["name"] not in work.restored.get(f.stem, set())]
    ctx.runtime.progress.plan(len(to_restore), sum(p["bytes"] for _f, p in to_restore),
                              skipped=len(folders) - len(work.pending))
    return to_restore


def folder_entries(work: Restoring) -> list[dict]:
    """Each folder's line of the report: its verification now, verified before, or where it stands."""
    entries = []
    for folder in work.folders:
        name, stem = folder.name, folder.stem
        entry: dict[str, Any] = {"folder": name, "stem": stem}
        entries.append(entry)
        result = work.verified_now.get(name)
        if isinstance(result, dict):
            entry.update(result)
            continue
        if stem not in work.pending_stems or stem in work.verified:
            entry.update(state="verified", files=folder.files + folder.large)
            continue
        where, details = folder_state(folder, work.zipped, work.restored, work.failed_parts)
        entry.update(state=where, **details)
        if where != "ready":
            continue
        if result is None or isinstance(result, StopRequested):  # ready, but not reached before a stop
            entry["state"] = "failed"
        else:
            log.error("folder %r could not be verified: %s", name, result)
            work.problems.append((f"verification of {name!r}", str(result)))
            entry.update(state="failed", error=str(result))
    return entries


def deletion_totals(report: dict, summaries: list[dict]) -> None:
    t = report["totals"]
    t["deleted_files"] = sum(len(d.get("deleted") or []) for d in summaries)
    t["deleted_dirs"] = sum(len(d.get("dirs_removed") or []) for d in summaries)
    t["kept_deleted_at_source"] = sum(len(d.get("kept") or []) + len(d.get("changed_at_destination") or [])
                                      for d in summaries)


def conclude(ctx: Run, work: Restoring) -> int:
    """After the passes: removed folders, the report (local, S3, stdout), the proof, the exit code."""
    cfg, records, layout = ctx.cfg, ctx.records, ctx.layout
    work.verified = {layout.stem_of(k["Key"]) for k in records.list_keys(layout.verified_of(work.gen))}
    work.restored = records.record_names(layout.restored_root)
    removed_report = handle_removed(ctx, work)
    entries = folder_entries(work)
    if work.local is not None:
        # Every folder of the map, not only this worker's shard: others may still be staging.
        remove_local_tmp(work.local, everything=not work.problems and all(e["state"] == "verified" for e in entries)
                         and work.map_complete and all(f.stem in work.verified for f in work.index.folders),
                         worker_id=cfg.worker_id)
    report = make_report(cfg, work.gen, entries, work.problems, mode="restore")
    report["removed_folders"] = removed_report
    deletion_totals(report, [d for d in (e.get("deleted_at_source") for e in [*entries, *removed_report])
                             if isinstance(d, dict)])
    t = report["totals"]
    if cfg.propagate_deletes:
        log.info("deleted at DESTINATION: %d files and %d folders; %d files deleted at SOURCE kept there",
                 t["deleted_files"], t["deleted_dirs"], t["kept_deleted_at_source"])
    path = write_report(cfg, records, layout, report)
    print_report(report)
    tell_proof(records, layout, report["proof"])
    log.info("report written to %s and s3://%s/%s", path, cfg.bucket, layout.report(report["run_id"]))
    if t["failed"] or work.problems:
        log.error("%d folders failed; run python_unzipper.py again to retry (restored parts are kept)", t["failed"])
        return EXIT_PARTIAL
    if t["waiting"]:
        log.warning("%d folders wait for the zipper; run python_zipper.py, then this again", t["waiting"])
        return EXIT_WAITING
    log.info("all %d folders restored and verified", t["verified"])
    if work.map_complete and all(f.stem in work.verified for f in work.index.folders):
        tell_complete(ctx, work.gen, t)
    return EXIT_OK


def tell_complete(ctx: Run, gen: int, totals: Mapping[str, Any]) -> None:
    """Tell NOTIFY_URLS once per map generation that the whole migration is restored and verified:
    whichever worker first creates the record tells (migrate.py tells it itself for its stages)."""
    cfg, notifier = ctx.cfg, ctx.runtime.notifier
    if cfg.dry_run or cfg.notify_by_parent or notifier is None or not notifier.enabled:
        return
    record = {"at": utc_now(), "worker": cfg.worker_id, "generation": gen}
    try:
        first = ctx.records.put_json_once(ctx.layout.notified(f"g{gen}-complete"), record)
    except MigrationError as exc:
        log.warning("the migration's completion is not told to NOTIFY_URLS: %s", exc)
        return
    if first:
        ctx.runtime.told_complete = True
        notifier.tell(Notice("success", "migration restored and verified",
                             "the migration is restored and verified at DESTINATION: "
                             f"{totals.get('files_verified', 0)} files in {totals.get('verified', 0)} folders "
                             f"(map generation {gen}; worker {cfg.worker_id})"))


def run(ctx: Run) -> int:
    cfg, records, layout = ctx.cfg, ctx.records, ctx.layout
    start_run(ctx)
    upstream = Upstream(ctx)
    view = None
    if "--verify" in ctx.argv:
        latest = latest_generation(records, layout)
    else:
        # Started with the mapper on a first map: its folders are restored as they are mapped and zipped.
        view = wait_for_map(ctx, upstream, partial="first")
        latest = None if view is None else (view.gen, view.as_index())
    if latest is None:
        if not all_generations(records, layout) and records.head(layout.folder_list) is not None:
            return run_legacy(ctx, verify="--verify" in ctx.argv or cfg.dry_run)
        log.error("no complete map on S3 under %r: run master_mapper.py, then python_zipper.py", cfg.prefix)
        return EXIT_WAITING
    gen, index = latest
    if local_destination(cfg) is None:  # a remote that is not configured: exit 2 now, not 3 per part
        ctx.rclone.features(destination_root(cfg), "DESTINATION")
    folders = [f for f in index.folders if ctx.in_shard(f.name)]
    if ctx.mode == "shards":
        log.info("static shard %d of %d: %d of the %d folders", cfg.worker_index, cfg.worker_count,
                 len(folders), len(index.folders))
    if "--verify" in ctx.argv:
        return verify_only(ctx, gen, folders)
    passes = Passes(ctx, SCRIPT)
    work = Restoring(ctx, gen, index, folders, passes, view)
    to_restore = announce(ctx, work)
    if cfg.dry_run:
        print_plan(ctx, work, to_restore)
        return EXIT_OK
    if work.pending and work.local is None:
        work.dest_features = ctx.rclone.features(destination_root(cfg))
    passes.held_of, passes.progress_of = work.held, work.progressed
    # Started with the zipper: restore its parts as their records appear, until it has ended.
    passes.look_again_while(lambda: upstream.reason() if work.waiting_for_zipper() or not view.complete else None)
    work.take(passes.run(work.units), passes.plan_errors)
    code = conclude(ctx, work)
    if not view.complete:
        log.error("map generation %d is not complete: the mapper ended without mapping every folder; run "
                  "master_mapper.py again (it continues), then python_zipper.py and python_unzipper.py", gen)
        return most_severe(code, EXIT_WAITING)
    return code


def planned_deletions(records: Records, layout: Layout, gen: int, index: dict, sources: dict,
                      deleted_done: set[str], removed: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{folder name: paths} of every file PROPAGATE_DELETES=1 would delete in this pass, where
    DESTINATION still holds what was restored: the files deleted at SOURCE, over every
    generation, of the folders whose deletions this generation has not handled yet."""
    names = {f.stem: f.name for f in index.folders}
    names.update({stem: name for name, stem in removed})
    doomed: dict[str, list[str]] = {}
    for stem, name in sorted(names.items(), key=lambda kv: kv[1]):
        if stem not in sources or stem in deleted_done:
            continue
        manifest = None
        if stem in {f.stem for f in index.folders}:
            _header, manifest = load_manifest(records, layout.manifest(gen, stem), os.path.join(
                records.cfg.tmp_dir, local_name(stem, f"g{gen}", "deletions.sqlite")))
        try:
            files = sorted(Deletions(stem, sources[stem]).load(records, manifest).files)
        finally:
            if manifest is not None:
                manifest.close()
        if files:
            doomed[name] = files
    return doomed


def guard_deletions(cfg: Config, records: Records, layout: Layout, index: IndexRecord,
                    doomed: dict[str, list[str]]) -> None:
    """MAX_DELETE: a pass that would delete more deletes nothing and exits 2. DRY_RUN lists every
    deletion by path. The limit is counted against the larger of this map and the one before it,
    so that a SOURCE that looks empty (an expired token, a failed mount) cannot pass for 10% of 0."""
    if not cfg.propagate_deletes:
        return
    total = sum(len(paths) for paths in doomed.values())
    mapped = index.total("files") + index.total("large")
    if index.previous is not None:
        before = read_index(records, layout, index.previous)
        if before is not None:
            mapped = max(mapped, before.total("files") + before.total("large"))
    allowed = cfg.deletions_allowed(mapped)
    over = total > allowed
    limit = cfg.environ.get("MAX_DELETE", "10%")
    if cfg.dry_run:
        for name, paths in doomed.items():
            for path in paths:
                out.info(f"would delete {name + '/' if name else ''}{path}\n")
        out.info(f"{total} files would be deleted at DESTINATION (PROPAGATE_DELETES=1), in {len(doomed)} folders; "
                 f"MAX_DELETE={limit} allows {allowed} of the {mapped} files mapped"
                 + ("; over MAX_DELETE: the real run deletes nothing and exits 2\n" if over else "\n"))
        return
    if over:
        raise DeleteLimit(
            f"PROPAGATE_DELETES=1 would delete {total} files at DESTINATION, more than MAX_DELETE={limit} "
            f"allows ({allowed} of the {mapped} files mapped); nothing was deleted. If SOURCE really lost them, "
            f"check DRY_RUN=1 (it lists every path), then allow it with MAX_DELETE={total} (or MAX_DELETE=100%); "
            "if not (an expired token, a failed mount), fix SOURCE and map it again with FORCE_RESCAN=1")
    if total:
        log.info("PROPAGATE_DELETES=1: up to %d files deleted at SOURCE are deleted at DESTINATION where they are "
                 "still as restored (MAX_DELETE=%s allows %d)", total, limit, allowed)


def deletion_sources(records: Records, layout: Layout, gen: int) -> dict[str, list[dict]]:
    """{stem: [{generation, changes_key, name}]}: every generation up to ``gen`` whose map found
    files or empty directories of that folder deleted at SOURCE (or the whole folder removed)."""
    out: dict[str, list[dict]] = {}
    for g in all_generations(records, layout):
        if g > gen:
            continue
        index = read_index(records, layout, g)
        if index is None:
            continue  # an unfinished generation
        folders = [(f.name, f.stem, f.changes, f.changes_key) for f in index.folders]
        removed = [(r.get("name"), r.get("stem"), r.get("changes"), r.get("changes_key")) for r in index.removed]
        for name, stem, changes, changes_key in folders + removed:
            c = changes or {}
            if changes_key and (c.get("deleted") or c.get("dirs_removed")):
                out.setdefault(stem, []).append({"generation": g, "changes_key": changes_key, "name": name})
    return out


def handle_removed(ctx: Run, work: Restoring) -> list[dict]:
    """Folders SOURCE no longer has: reported; with PROPAGATE_DELETES=1 their copies deleted (each
    under a claim, once per generation)."""
    cfg = ctx.cfg
    if work.removed and cfg.propagate_deletes and not work.dest_features and local_destination(cfg) is None:
        work.dest_features = ctx.rclone.features(destination_root(cfg))
    tasks = [((name, stem), functools.partial(_handle_removed, ctx, work, name, stem)) for name, stem in work.removed]
    results = []
    for (name, stem), result in WorkerPool(cfg.max_parallel_workers, ctx.runtime).run(tasks):
        if isinstance(result, Skipped):
            results.append({"folder": name, "stem": stem, "destination": f"handled by another worker ({result.why})"})
        elif isinstance(result, BaseException):
            log.error("removed folder %r: %s", name, result)
            work.problems.append((f"removed folder {name!r}", str(result)))
            results.append({"folder": name, "stem": stem, "destination": "failed", "error": str(result)})
        else:
            results.append(result)
    ctx.runtime.check()
    return results


def _handle_removed(ctx: Run, work: Restoring, name: str, stem: str) -> dict | Skipped:
    gen, records, layout = work.gen, ctx.records, ctx.layout
    job = functools.partial(_finish_removed_now, ctx, work, name, stem)
    if not ctx.cfg.propagate_deletes:
        return job()
    if stem in work.deleted_done:
        record = records.get_json(layout.deletions(gen, stem)) or {}
        return {"folder": name, "stem": stem, "destination": "removed earlier",
                "deleted_at_source": {k: record.get(k) for k in ("files", "absent", "deleted",
                                                                 "changed_at_destination", "dirs_removed")}}
    return work.passes.claims("verify").run(stem, "removed", job,
                                            done=functools.partial(ctx.exists, layout.deletions(gen, stem)))


def _finish_removed_now(ctx: Run, work: Restoring, name: str, stem: str) -> dict:
    deletions = Deletions(stem, work.sources[stem]).load(ctx.records, None)
    return finish_removed(ctx, work.gen, name, stem, deletions, work.dest_features)


def main(argv: Sequence[str] | None = None, environ: dict | None = None) -> int:
    return run_script(SCRIPT, __doc__, run, argv, environ, options=("--verify", "--status"))


if __name__ == "__main__":
    sys.exit(main())
