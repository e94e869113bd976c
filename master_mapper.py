"""master_mapper.py: list SOURCE with rclone and store the map of the migration on S3.

The map is the plan every later run follows: for each top-level folder of SOURCE (and
for the files directly in SOURCE) every file's path, size, modification time and the
source's own hashes, the empty directories, the files too large for zips, and the
split of the normal files into zip parts. A rerun continues an unfinished map;
FORCE_RESCAN=1 lists SOURCE again as a new generation, and the zipper and unzipper
then move only what changed.

Usage: python master_mapper.py [--help | --status [--html FILE]]

  --status   one table of the whole migration across all stages, read from S3 (no lock)
  --html FILE  with --status: also write it as one self-contained HTML page (README: Status page)

Example:
  SOURCE=onedrive:"Work Files" S3_BUCKET=my-hub S3_ENDPOINT=https://s3.wasabisys.com \\
    python master_mapper.py
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from common_s3 import (all_generations, assign_stems, Config, ConfigError, count, EXIT_OK, EXIT_PARTIAL,
                       EXIT_WAITING, folder_entry, folder_totals, FolderEntry, FolderIndex, GIB, human_bytes, IndexRecord, is_local_path,
                       latest_generation, Layout, load_manifest, local_name, log_context, manifest_version,
                       ManifestHeader, MigrationError, out, Passes, PlanRecord, Rclone, RcloneError,
                       read_index, read_manifest_header, RecordError, Records, remote_join, ROOT_LABEL, Run, run_script,
                       SERVER_MTIME, shard_of, start_run, StopRequested, table_lines, Unit, utc_now)

log = logging.getLogger("master_mapper")

SCRIPT = "mapper"


# Pure planning

def plan_parts(files: Iterable[tuple[str, int]], *, max_files: int,
               max_bytes: int) -> list[tuple[str, int, int]]:
    """Split consecutive files into parts of at most ``max_files`` files and ``max_bytes`` bytes.

    Returns, per part, (path of its first file, number of files, bytes). Files are taken in
    the order given (sorted by path), so the same map always gives the same parts.
    """
    parts: list[tuple[str, int, int]] = []
    count = size_sum = 0
    first = ""
    for path, size in files:
        if count and (count >= max_files or size_sum + size > max_bytes):
            parts.append((first, count, size_sum))
            count = size_sum = 0
        if count == 0:
            first = path
        count += 1
        size_sum += size
    if count:
        parts.append((first, count, size_sum))
    return parts


def part_names(n_parts: int, first_number: int) -> list[str]:
    """``Full`` when a folder has a single part in its first generation, else ``PartN``."""
    if first_number == 1 and n_parts == 1:
        return ["Full"]
    return [f"Part{first_number + i}" for i in range(n_parts)]


# I/O

def listing_hash_kinds(source: dict, destination: dict | None, local_source: bool) -> list[str]:
    """The hash kinds worth listing at SOURCE: none where each costs a read of every file (a
    local disk, SFTP's md5sum over ssh: rclone's SlowHash), else those DESTINATION offers too
    (a large file's copy is checked by one), or one kind to tell a changed file in a delta pass."""
    if local_source or source.get("Name") == "local" or source.get("SlowHash"):
        return []
    kinds = list(source.get("Hashes") or [])
    if destination is not None:
        shared = [k for k in kinds if k in (destination.get("Hashes") or [])]
        return shared or kinds[:1]
    return kinds


def list_into_index(rclone: Rclone, path: str, index: FolderIndex, *, recursive: bool, hashes: Sequence[str],
                    threshold: int, what: str) -> None:
    """Stream one listing of SOURCE into ``index``; a failed listing raises, never yields 'empty'.
    An index of kind SERVER_MTIME is listed with S3's LastModified (no HEAD per object)."""
    flags = ["--no-mimetype"]
    if index.mtime_kind == SERVER_MTIME:
        flags.append("--use-server-modtime")
    if recursive:
        flags.append("-R")
    else:
        flags.append("--files-only")
    for kind in hashes:
        flags += ["--hash", "--hash-type", kind]
    n = 0
    for entry in rclone.lsjson(path, flags, what=what):
        rel = entry.get("Path")
        if not isinstance(rel, str) or not rel:
            raise RcloneError(what, None, ["lsjson", path], f"an entry without a path: {entry!r:.200}")
        if entry.get("IsDir"):
            index.add_listing_dir(rel)
            index.add_parent(rel)
            continue
        size = int(entry.get("Size", -1))
        if size < 0:
            raise RcloneError(what, None, ["lsjson", path],
                              f"{rel!r} has an unknown size; this backend cannot be mapped")
        kind = "l" if size > threshold else "f"
        index.add(rel, kind, size, entry.get("ModTime", ""),
                  {k: v for k, v in (entry.get("Hashes") or {}).items() if v})
        index.add_parent(rel)
        n += 1
        if n % 50000 == 0:
            index.commit()
            log.info("listed %d files so far", n)
    index.finish_listing()
    index.commit()


def _hashes_differ(old: str, new: str) -> int:
    a, b = json.loads(old or "{}"), json.loads(new or "{}")
    return int(any(a[k] != b[k] for k in set(a) & set(b) if a[k] and b[k]))


CHANGE_COUNTS = ("added", "changed", "unchanged", "deleted", "dirs_added", "dirs_removed")


def _keep_unchanged_parts(db, changes_path: str | None, was_kind: str | None) -> dict:
    """With ``prev`` attached: every file unchanged since the previous generation keeps its part
    (unless the zipper left it out of that part); the difference is written; its counts returned."""
    same = ("FROM prev.e o WHERE o.path = e.path AND o.kind = 'f' AND o.part IS NOT NULL "
            "AND o.size = e.size AND o.mtime = e.mtime AND hashes_differ(o.hashes, e.hashes) = 0 "
            "AND NOT EXISTS (SELECT 1 FROM main.leftout l WHERE l.path = e.path AND l.part = o.part)")
    db.execute(f"UPDATE e SET part = (SELECT o.part {same}), gen = (SELECT o.gen {same}) "
               f"WHERE kind = 'f' AND EXISTS (SELECT 1 {same})")
    return write_changes(db, changes_path, was_kind)


def assign_new_parts(index: FolderIndex, previous: FolderIndex | None, gen: int, next_part: int,
                     cfg: Config, changes_path: str | None = None,
                     left_out: Iterable[tuple[str, str]] = ()) -> tuple[list[dict], int, dict]:
    """Keep the part of every unchanged file; pack added and changed files into new parts.

    With a previous generation of the folder, its difference (files added, changed, deleted;
    empty directories added and removed) is written to ``changes_path`` as gzip JSON lines.
    Works in SQL on the two SQLite files, so memory does not grow with the folder.
    Files the zipper left out of their part as unreadable (``left_out``: (path, part)) are
    packed again, changed or not.
    Returns (new parts [{name, files, bytes}], next free part number, change counts).
    """
    db = index.db
    db.execute("CREATE TABLE IF NOT EXISTS leftout (path TEXT, part TEXT)")
    db.executemany("INSERT INTO leftout VALUES (?, ?)", list(left_out))
    total, total_bytes = (a + b for a, b in zip(index.count("f"), index.count("l")))
    dirs = index.count("d")[0]
    changes = {"new_folder": True, "added": total, "added_bytes": total_bytes, "changed": 0,
               "changed_bytes": 0, "unchanged": 0, "deleted": 0, "deleted_bytes": 0,
               "dirs_added": dirs, "dirs_removed": 0}
    if previous is not None:
        db.create_function("hashes_differ", 2, _hashes_differ, deterministic=True)
        with index.attached(previous):
            changes = _keep_unchanged_parts(db, changes_path, previous.mtime_kind)
    # Where each new part starts (memory grows with parts, not files).
    starts = plan_parts(_pending(db), max_files=cfg.split_threshold, max_bytes=cfg.max_zip_bytes)
    names = part_names(len(starts), next_part)
    parts = []
    for i, (name, (first_path, n, nbytes)) in enumerate(zip(names, starts)):
        upper = starts[i + 1][0] if i + 1 < len(starts) else None
        sql = "UPDATE e SET part = ?, gen = ? WHERE kind = 'f' AND part IS NULL AND path >= ?"
        args: list = [name, gen, first_path]
        if upper is not None:
            sql += " AND path < ?"
            args.append(upper)
        db.execute(sql, args)
        parts.append({"name": name, "files": n, "bytes": nbytes})
    index.commit()
    return parts, next_part + len(starts), changes


# The difference between two listings of a folder, in SQL over ``e`` (now) and ``prev.e``.
_FILE = "kind IN ('f', 'l')"
_DIFF = {
    "added": f"SELECT e.path, e.kind, e.size, e.mtime, e.hashes, NULL, NULL, NULL, NULL, NULL FROM e "
             f"WHERE e.{_FILE} AND NOT EXISTS (SELECT 1 FROM prev.e o WHERE o.path = e.path AND o.{_FILE})",
    "changed": f"SELECT e.path, e.kind, e.size, e.mtime, e.hashes, o.kind, o.size, o.mtime, o.hashes, o.part "
               f"FROM e JOIN prev.e o ON o.path = e.path WHERE e.{_FILE} AND o.{_FILE} AND (o.kind != e.kind "
               f"OR o.size != e.size OR o.mtime != e.mtime OR hashes_differ(o.hashes, e.hashes) = 1)",
    "deleted": f"SELECT o.path, NULL, NULL, NULL, NULL, o.kind, o.size, o.mtime, o.hashes, o.part FROM prev.e o "
               f"WHERE o.{_FILE} AND NOT EXISTS (SELECT 1 FROM e WHERE e.path = o.path AND e.{_FILE})",
    "dir_added": "SELECT e.path, 'd', 0, '', '{}', NULL, NULL, NULL, NULL, NULL FROM e WHERE e.kind = 'd' "
                 "AND NOT EXISTS (SELECT 1 FROM prev.e o WHERE o.path = e.path AND o.kind = 'd')",
    "dir_removed": "SELECT o.path, NULL, NULL, NULL, NULL, 'd', 0, '', '{}', NULL FROM prev.e o WHERE o.kind = 'd' "
                   "AND NOT EXISTS (SELECT 1 FROM e WHERE e.path = o.path AND e.kind = 'd')",
}


def change_line(op: str, row: Sequence, was_kind: str | None = None) -> dict:
    """One line of a changes file: the entry now and, for a change or a deletion, what it was
    (with the part that holds the old bytes: what a DESTINATION copy is checked against;
    ``mtime_kind`` SERVER_MTIME when its ``m`` is the old object's LastModified, not its mtime)."""
    path, kind, size, mtime, hashes, okind, osize, omtime, ohashes, opart = row
    line: dict[str, Any] = {"op": op, "p": path}
    if kind is not None:
        line["t"] = kind
        if kind != "d":
            line.update(s=size, m=mtime)
            if hashes and hashes != "{}":
                line["h"] = json.loads(hashes)
    if okind is not None and op != "dir_added":
        was: dict[str, Any] = {"t": okind}
        if okind != "d":
            was.update(s=osize, m=omtime)
            if ohashes and ohashes != "{}":
                was["h"] = json.loads(ohashes)
            if opart:
                was["part"] = opart
            if was_kind:
                was["mtime_kind"] = was_kind
        line["was"] = was
    return line


def write_changes(db, path: str | None, was_kind: str | None = None) -> dict:
    """Count (and, given ``path``, write) the folder's difference; ``prev`` must be attached
    (``was_kind``: the mtime kind of its manifest)."""
    counts = {"new_folder": False, "added": 0, "added_bytes": 0, "changed": 0, "changed_bytes": 0,
              "unchanged": 0, "deleted": 0, "deleted_bytes": 0, "dirs_added": 0, "dirs_removed": 0}
    out_fh = gzip.open(path, "wb", compresslevel=6) if path else None
    try:
        for op, sql in _DIFF.items():
            key = {"dir_added": "dirs_added", "dir_removed": "dirs_removed"}.get(op, op)
            cur = db.execute(sql)
            while True:
                rows = cur.fetchmany(2000)
                if not rows:
                    break
                for row in rows:
                    counts[key] += 1
                    if op in ("added", "changed"):
                        counts[op + "_bytes"] += row[2]
                    elif op == "deleted":
                        counts["deleted_bytes"] += row[6]
                    if out_fh is not None:
                        out_fh.write(json.dumps(change_line(op, row, was_kind), ensure_ascii=False, sort_keys=True)
                                     .encode("utf-8", "surrogateescape") + b"\n")
    finally:
        if out_fh is not None:
            out_fh.close()
    total = db.execute(f"SELECT COUNT(*) FROM e WHERE {_FILE}").fetchone()[0]
    counts["unchanged"] = total - counts["added"] - counts["changed"]
    return counts


def _pending(db) -> Iterable[tuple[str, int]]:
    cur = db.execute("SELECT path, size FROM e WHERE kind = 'f' AND part IS NULL ORDER BY path")
    while True:
        rows = cur.fetchmany(2000)
        if not rows:
            return
        yield from rows


def write_manifest(ctx: Run, job: FolderJob, index: FolderIndex, header_extra: dict) -> dict:
    """Write the folder's manifest (create-only) and its original objects; return its summary."""
    cfg, records, layout, tmp = ctx.cfg, ctx.records, ctx.layout, ctx.cfg.tmp_dir
    gen, name, stem = job.gen, job.name, job.stem
    files, nbytes = index.count("f")
    large, large_bytes = index.count("l")
    dirs, _ = index.count("d")
    was_kind = header_extra.pop("was_mtime_kind", None)
    header = ManifestHeader(type="folder", version=manifest_version(index.mtime_kind, was_kind), name=name,
                            stem=stem, generation=gen, files=files, bytes=nbytes, large=large,
                            large_bytes=large_bytes, dirs=dirs, source=cfg.source, mtime_kind=index.mtime_kind,
                            **header_extra)
    path = os.path.join(tmp, local_name(stem, "manifest.gz"))
    with gzip.open(path, "wb", compresslevel=6) as gz:
        gz.write(json.dumps(header.to_json(), ensure_ascii=False, sort_keys=True).encode() + b"\n")
        for row in index.rows():
            out: dict[str, Any] = {"t": row["kind"], "p": row["path"]}
            if row["kind"] != "d":
                out.update(s=row["size"], m=row["mtime"])
                if row["hashes"]:
                    out["h"] = row["hashes"]
            if row["kind"] == "f":
                out.update(part=row["part"], g=row["gen"])
            gz.write(json.dumps(out, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    try:
        with open(path, "rb") as fh:
            if not records.put_once(layout.manifest(gen, stem), fh.read(), content_type="application/gzip"):
                log.info("manifest of generation %d already written by another worker; kept", gen)
    finally:
        os.remove(path)
    if name:
        write_original_objects(ctx, job, index, files, large)
    return {"name": name, "stem": stem, "files": files, "bytes": nbytes, "large": large,
            "large_bytes": large_bytes, "dirs": dirs, **header_extra}


def write_original_objects(ctx: Run, job: FolderJob, index: FolderIndex, files: int, large: int) -> None:
    """``_List.txt``, ``_LargeFiles.json`` (removed when there are none: no stale list) and the
    mapper's original progress record. They describe the latest generation; nothing reads them
    back for a decision."""
    records, layout, tmp, stem, name = ctx.records, ctx.layout, ctx.cfg.tmp_dir, job.stem, job.name
    path = os.path.join(tmp, local_name(stem, "list.txt"))
    with open(path, "wb") as fh:
        first = True
        for row in index.rows("f"):
            fh.write((b"" if first else b"\n") + row["path"].encode("utf-8", "surrogateescape"))
            first = False
    try:
        with open(path, "rb") as fh:
            records.put_bytes(layout.list_txt(stem), fh.read(), content_type="text/plain; charset=utf-8")
    finally:
        os.remove(path)
    larges = [{"path": r["path"], "size": r["size"], "size_gb": round(r["size"] / GIB, 2)}
              for r in index.rows("l")]
    if larges:
        records.put_bytes(layout.large_json(stem),
                          json.dumps(larges, ensure_ascii=False, indent=2).encode("utf-8"),
                          content_type="application/json; charset=utf-8")
    elif records.head(layout.large_json(stem)) is not None:
        records.delete(layout.large_json(stem))
    records.put_json(layout.legacy_progress(stem, "mapper"),
                     {"folder_name": name, "normal_files": files, "large_files": large,
                      "scanned_at": utc_now(), "status": "scanned", "processed_folders": [name]})


def map_folder(ctx: Run, job: FolderJob) -> dict:
    """List one folder (or the root unit) into a manifest; return its summary for the index."""
    cfg, records, layout, rclone, runtime = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime
    gen, name, stem, hashes, previous = job.gen, job.name, job.stem, job.hashes, job.previous
    runtime.check()
    tmp = cfg.tmp_dir
    path = remote_join(cfg.source, name) if name else cfg.source
    with runtime.progress.unit(f"map {name or ROOT_LABEL}", name), log_context(folder=name), FolderIndex(os.path.join(tmp, local_name(stem, f"g{gen}", "sqlite")), job.mtime_kind) as index:
        started = time.monotonic()
        list_into_index(rclone, path, index, recursive=bool(name), hashes=hashes,
                        threshold=cfg.large_file_threshold_bytes, what=f"lsjson of {path!r}")
        prev_index = None
        prev_kind = None
        next_part = 1
        changes_path = os.path.join(tmp, local_name(stem, f"g{gen}", "changes.gz"))
        try:
            if previous is not None:
                next_part = int(previous["next_part"])
                header, prev_index = load_manifest(records, previous["manifest"],
                                                   os.path.join(tmp, local_name(stem, "prev.sqlite")))
                prev_kind = header.mtime_kind
            left_out = read_left_out(records, layout, stem) if previous is not None else []
            if left_out:
                log.info("%d files the zipper could not read at SOURCE go into new parts (first: %r)",
                         len(left_out), left_out[0][0])
            parts, next_part, changes = assign_new_parts(index, prev_index, gen, next_part, cfg,
                                                         changes_path if previous is not None else None,
                                                         left_out)
        finally:
            if prev_index is not None:
                prev_index.close()
        part_table = [{"name": p, "files": n, "bytes": b} for p, n, b in index.db.execute(
            "SELECT part, COUNT(*), SUM(size) FROM e WHERE kind = 'f' GROUP BY part ORDER BY part")]
        try:
            if cfg.dry_run:
                return {"name": name, "stem": stem, **_dry_summary(index), "parts": parts, "changes": changes}
            runtime.confirm_claim()
            extra = {"parts": parts, "part_table": part_table, "next_part": next_part, "changes": changes}
            if previous is not None:
                extra["changes_key"] = upload_changes(records, layout, gen, stem, changes_path)
                extra["previous_generation"] = previous["generation"]
                extra["was_mtime_kind"] = prev_kind
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(changes_path)
        summary = write_manifest(ctx, job, index, extra)
        if previous is not None:
            log.info("since generation %d: %d files added, %d changed, %d deleted, %d unchanged; "
                     "%d empty directories added, %d removed", previous["generation"], changes["added"],
                     changes["changed"], changes["deleted"], changes["unchanged"], changes["dirs_added"],
                     changes["dirs_removed"])
        log.info("mapped %s (%.1f MiB) in %s, %s, %s "
                 "in %.1fs", count(summary["files"], "file"), summary["bytes"] / (1 << 20),
                 count(len(parts), "new part"), count(summary["large"], "large file"),
                 count(summary["dirs"], "empty directory").replace("directorys", "directories"),
                 time.monotonic() - started)
        for row in index.rows("l"):
            log.info("large file %s (%s) goes SOURCE to DESTINATION directly", row["path"], human_bytes(row["size"]))
        return summary


def read_left_out(records: Records, layout: Layout, stem: str) -> list[tuple[str, str]]:
    """(path, part) of every file the zipper left out of a published part of this folder as unreadable."""
    found = []
    for item in records.list_keys(layout.left_out_of(stem)):
        marker = records.get_json(item["Key"])
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
            raise RecordError(item["Key"], "not a left-out record")
        found += [(f["path"], marker.get("part")) for f in marker["files"] if isinstance(f, dict) and "path" in f]
    return found


def _dry_summary(index: FolderIndex) -> dict:
    (files, nbytes), (large, large_bytes) = index.count("f"), index.count("l")
    return {"files": files, "bytes": nbytes, "large": large, "large_bytes": large_bytes,
            "dirs": index.count("d")[0], "large_files": [(r["path"], r["size"]) for r in index.rows("l")]}


def upload_changes(records: Records, layout: Layout, gen: int, stem: str, path: str) -> str:
    """Store a changes file create-only under a key named by its SHA-256 (the manifest or the
    removed-folder record names that key, so nobody can swap the file it names); return the key."""
    with open(path, "rb") as fh:
        body = fh.read()
    key = layout.changes(gen, stem, hashlib.sha256(body).hexdigest())
    records.put_once(key, body, content_type="application/gzip")
    return key


def record_removed_folder(ctx: Run, job: FolderJob) -> dict:
    """A folder of the previous generation that SOURCE no longer has: everything it held is
    deleted at SOURCE. Write that as its changes file, then the folder's removed record."""
    cfg, records, layout, runtime = ctx.cfg, ctx.records, ctx.layout, ctx.runtime
    gen, name, stem, previous = job.gen, job.name, job.stem, job.previous
    assert previous is not None
    tmp = cfg.tmp_dir
    runtime.check()
    with log_context(folder=name):
        header, prev_index = load_manifest(records, previous["manifest"],
                                           os.path.join(tmp, local_name(stem, f"g{gen}", "removed.sqlite")))
        path = os.path.join(tmp, local_name(stem, f"g{gen}", "removed.gz"))
        try:
            empty = FolderIndex(os.path.join(tmp, local_name(stem, f"g{gen}", "empty.sqlite")))
            try:
                empty.db.create_function("hashes_differ", 2, _hashes_differ, deterministic=True)
                with empty.attached(prev_index) as db:
                    counts = write_changes(db, path, header.mtime_kind)
            finally:
                empty.close()
            if cfg.dry_run:
                return {"name": name, "stem": stem, "removed": True, "changes": counts}
            runtime.confirm_claim()
            key = upload_changes(records, layout, gen, stem, path)
        finally:
            prev_index.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        record = {"name": name, "stem": stem, "generation": gen, "previous_generation": previous["generation"],
                  "changes": counts, "changes_key": key, "recorded_at": utc_now()}
        if not records.put_json_once(layout.removed(gen, stem), record):
            log.info("removed folder already recorded by another worker; kept")
        log.warning("folder %r is no longer at SOURCE: %d files (%s) and %d empty directories of it are "
                    "deleted at SOURCE", name, counts["deleted"], human_bytes(counts["deleted_bytes"]),
                    counts["dirs_removed"])
        return record


def discover(rclone: Rclone, source: str) -> list[str]:
    """Top-level folders of SOURCE, by their exact names."""
    if is_local_path(source) and not os.path.isdir(source):
        raise ConfigError(f"SOURCE={source!r} does not exist or is not a folder; correct SOURCE, or check "
                          "that the drive is mounted")
    names = []
    try:
        for entry in rclone.lsjson(source, ["--no-mimetype", "--dirs-only"], what=f"lsjson of {source!r}"):
            if entry.get("IsDir") and isinstance(entry.get("Path"), str):
                names.append(entry["Path"])
    except RcloneError as exc:
        raise rclone.permanent(exc, "SOURCE", source) or exc from None
    return sorted(names)


@dataclass(frozen=True)
class FolderJob:
    """One mapper unit: a folder of SOURCE (``""`` for the files directly in it) to list into
    generation ``gen``, or (``removed``) a folder of the previous generation SOURCE no longer has.
    ``previous`` is the folder in the previous generation ({manifest, next_part, generation})."""

    gen: int
    name: str
    stem: str
    hashes: tuple[str, ...] = ()
    previous: dict | None = field(default=None, compare=False)
    removed: bool = False
    mtime_kind: str | None = None

    @property
    def unit_key(self) -> str:
        return ("removed:" if self.removed else "") + self.stem


def open_generation(ctx: Run, latest: tuple[int, IndexRecord] | None, gens: list[int],
                    unfinished: list[int]) -> PlanRecord:
    """The plan of the generation this run maps: the unfinished one, or a new one, written
    create-only (a mapper that started the same generation at the same moment is joined)."""
    cfg, records, layout = ctx.cfg, ctx.records, ctx.layout
    if unfinished:
        gen = unfinished[-1]
        found = records.get_json(layout.plan(gen))
        if found is None:
            raise RecordError(layout.plan(gen), "an unfinished generation without a readable plan")
        plan = PlanRecord.from_json(layout.plan(gen), found)
        if plan.source != cfg.source:
            raise ConfigError(f"SOURCE={cfg.source!r} differs from the unfinished map's source {plan.source!r}")
        log.info("continuing unfinished map generation %d", gen)
        return plan
    gen = (gens[-1] + 1) if gens else 1
    previous_stems, previous = previous_folders(ctx, latest)
    names = discover(ctx.rclone, cfg.source)
    stems = assign_stems(names, previous_stems)
    # Folders of the previous generation that SOURCE no longer has: their files are deleted
    # at SOURCE, recorded as units of their own (a removed record and its changes file).
    removed = [{"name": n, "stem": previous_stems[n]} for n in sorted(previous) if n and n not in stems]
    plan = PlanRecord(generation=gen, created_at=utc_now(), source=cfg.source,
                      folders=[{"name": n, "stem": stems[n]} for n in [""] + names],
                      previous=latest[0] if latest else None, removed=removed,
                      retired_stems={n: s for n, s in previous_stems.items() if n not in stems},
                      large_file_threshold_bytes=cfg.large_file_threshold_bytes,
                      split_threshold=cfg.split_threshold, max_zip_bytes=cfg.max_zip_bytes,
                      mtime_kind=choose_mtime_kind(ctx, latest))
    if not cfg.dry_run and not records.put_json_once(layout.plan(gen), plan.to_json()):
        try:
            theirs = PlanRecord.from_json(layout.plan(gen), records.get_json(layout.plan(gen)))
        except RecordError:
            theirs = None
        if theirs is None or theirs.source != cfg.source:
            raise MigrationError(f"another mapper started generation {gen} at the same moment, of "
                                 f"another SOURCE or unreadable ({layout.plan(gen)!r}); run again")
        plan = theirs
        log.info("another mapper started generation %d at the same moment; joining it", gen)
    log.info("map generation %d: %d folders and the files directly in SOURCE", gen, len(names))
    return plan


def choose_mtime_kind(ctx: Run, latest: tuple[int, IndexRecord] | None) -> str | None:
    """What the map's mtimes are (``PlanRecord.mtime_kind``). An S3-backed SOURCE keeps each
    file's mtime in object metadata, which rclone reads with one HEAD per object; the listing's
    LastModified (SERVER_MTIME) costs none and changes on every upload, so it tells versions
    apart, and the zipper takes the real mtime from the downloaded file. A delta pass keeps the
    kind of the generation before it (times of two kinds never compare equal: every file would
    be moved again)."""
    if latest is not None:
        before = ctx.records.get_json(ctx.layout.plan(latest[0]))
        kind = PlanRecord.from_json(ctx.layout.plan(latest[0]), before).mtime_kind if before is not None else None
        if kind != SERVER_MTIME:
            log.info("SOURCE's mtimes are listed per object, as in map generation %d", latest[0])
        return kind
    if ctx.rclone.backend_type(ctx.cfg.source) == "s3":
        log.info("SOURCE is S3-backed: listed with each object's LastModified (no request per object); "
                 "each file's own mtime is taken from its download")
        return SERVER_MTIME
    return None


def previous_folders(ctx: Run, latest: tuple[int, IndexRecord] | None) -> tuple[dict[str, str], dict[str, dict]]:
    """From the latest complete generation: every stem ever given to a name ({name: stem}, so a
    folder keeps its stem), and each folder's manifest, next part number and generation."""
    stems: dict[str, str] = {}
    folders: dict[str, dict] = {}
    if latest:
        for f in latest[1].folders:
            stems[f.name] = f.stem
            folders[f.name] = {"manifest": ctx.layout.manifest(latest[0], f.stem),
                               "next_part": f.next_part or 1, "generation": latest[0]}
        stems.update(latest[1].retired_stems)
    return stems, folders


def source_hash_kinds(ctx: Run) -> tuple[str, ...]:
    """The hash kinds to list SOURCE with (see ``listing_hash_kinds``), said once."""
    cfg, rclone = ctx.cfg, ctx.rclone
    features = rclone.features(cfg.source, "SOURCE")
    dest_features = None
    if cfg.destination and not is_local_path(cfg.destination):
        try:
            dest_features = rclone.features(cfg.destination, "DESTINATION")
        except RcloneError as exc:  # the zipper and unzipper report DESTINATION's own trouble
            log.warning("DESTINATION's features could not be read (%s); every cheap SOURCE hash is listed", exc)
    hashes = listing_hash_kinds(features, dest_features, is_local_path(cfg.source))
    log.info("SOURCE backend %s; hashes %s", features["Name"] or "?",
             ", ".join(hashes) if hashes else "not listed (%s)" % (
                 "SOURCE computes them by reading every file; the zipper's MD5s are the proof"
                 if features["Hashes"] else "SOURCE offers none; the zipper's MD5s are the proof"))
    return tuple(hashes)


class Mapping:
    """The mapper's units of one generation, planned afresh for each pass from a fresh listing
    of the folder manifests and removed records written so far."""

    def __init__(self, ctx: Run, plan: PlanRecord, latest: tuple[int, IndexRecord] | None,
                 hashes: tuple[str, ...]):
        self.ctx, self.gen = ctx, plan.generation
        previous = previous_folders(ctx, latest)[1]
        self.jobs = [FolderJob(self.gen, f["name"], f["stem"], hashes, previous.get(f["name"]),
                               mtime_kind=plan.mtime_kind) for f in plan.folders]
        self.jobs += [FolderJob(self.gen, r["name"], r["stem"], previous=previous[r["name"]], removed=True)
                      for r in plan.removed]
        self.mine = [j for j in self.jobs if ctx.in_shard(j.name)]
        self._done: set[str] | None = None

    def mapped(self) -> set[str]:
        """Unit keys of this generation that are done: folder manifests and removed records."""
        layout, records = self.ctx.layout, self.ctx.records
        return ({layout.stem_of(item["Key"]) for item in records.list_keys(layout.manifests_of(self.gen))}
                | {"removed:" + layout.stem_of(item["Key"]) for item in records.list_keys(layout.removed_of(self.gen))})

    def done_now(self) -> set[str]:
        if self._done is None:
            self._done = self.mapped()
        return self._done

    def units(self) -> Iterator[Unit]:
        done, self._done = self.done_now(), None
        layout = self.ctx.layout
        for job in self.mine:
            if job.unit_key in done:
                continue
            if job.removed:
                yield Unit(SCRIPT, "removed", job.name, job.stem, "removed", f"removed folder {job.name!r}",
                           functools.partial(record_removed_folder, self.ctx, job),
                           (layout.removed(self.gen, job.stem),))
            else:
                yield Unit(SCRIPT, "folder", job.name, job.stem, "folder", f"folder {job.name or ROOT_LABEL!r}",
                           functools.partial(map_folder, self.ctx, job), (layout.manifest(self.gen, job.stem),))


def write_index(ctx: Run, plan: PlanRecord) -> IndexRecord:
    """Every manifest exists: the generation's index from their headers (also those of earlier
    runs), written create-only; the index that stands is returned."""
    records, layout, gen = ctx.records, ctx.layout, plan.generation
    folders = []
    for folder in plan.folders:
        folders.append(folder_entry(read_manifest_header(records, layout.manifest(gen, folder["stem"]))))
    removed = []
    for folder in plan.removed:
        record = records.get_json(layout.removed(gen, folder["stem"]))
        if not isinstance(record, dict) or not isinstance(record.get("changes"), dict):
            raise RecordError(layout.removed(gen, folder["stem"]), "not a removed-folder record")
        removed.append({k: record.get(k) for k in ("name", "stem", "changes", "changes_key")})
    index = IndexRecord(generation=gen, folders=folders, created_at=plan.created_at, completed_at=utc_now(),
                        source=ctx.cfg.source, previous=plan.previous, removed=removed,
                        retired_stems=plan.retired_stems,
                        totals=folder_totals(folders),
                        changes=change_totals(folders, removed) if plan.previous is not None else None)
    if not records.put_json_once(layout.index(gen), index.to_json()):
        log.info("generation %d was completed by another worker; its index is kept", gen)
        index = read_index(records, layout, gen) or index
    return index


def say_complete(index: IndexRecord) -> None:
    t = index.totals
    log.info("map generation %d complete: %d folders, %d files (%.1f MiB), %d large files, "
             "%d empty directories, %d new parts", index.generation, len(index.folders), t["files"],
             t["bytes"] / (1 << 20), t["large"], t["dirs"], sum(len(f.parts or []) for f in index.folders))
    c = index.changes
    if c:
        log.info("since generation %d: %d files added (%s), %d changed (%s), %d deleted (%s), %d unchanged; "
                 "%d folders added, %d removed; %d empty directories added, %d removed", index.previous,
                 c["added"], human_bytes(c["added_bytes"]), c["changed"], human_bytes(c["changed_bytes"]),
                 c["deleted"], human_bytes(c["deleted_bytes"]), c["unchanged"], len(c["folders_added"]),
                 len(c["folders_removed"]), c["dirs_added"], c["dirs_removed"])
        if c["deleted"] or c["dirs_removed"]:
            log.warning("files deleted at SOURCE stay at DESTINATION unless python_unzipper.py runs with "
                        "PROPAGATE_DELETES=1 (it then deletes only copies that still match what was restored)")


def map_is_complete(ctx: Run, latest: tuple[int, IndexRecord]) -> int:
    """Nothing to map: the latest generation is complete and no rescan was asked for."""
    gen, index = latest
    if index.source != ctx.cfg.source:
        raise ConfigError(f"SOURCE={ctx.cfg.source!r} differs from the map's source {index.source!r}; "
                          "set FORCE_RESCAN=1 to map the new SOURCE as a new generation")
    if not ctx.cfg.dry_run:
        write_folder_list(ctx.records, ctx.layout, index)
    log.info("the map is complete (generation %d, %d folders); set FORCE_RESCAN=1 to list SOURCE again",
             gen, len(index.folders))
    return EXIT_OK


def run(ctx: Run) -> int:
    cfg, records, layout = ctx.cfg, ctx.records, ctx.layout
    start_run(ctx)
    latest = latest_generation(records, layout)
    gens = all_generations(records, layout)
    unfinished = [g for g in gens if (latest is None or g > latest[0]) and records.head(layout.index(g)) is None]
    if latest and not cfg.force_rescan and not unfinished:
        return map_is_complete(ctx, latest)
    plan = open_generation(ctx, latest, gens, unfinished)
    work = Mapping(ctx, plan, latest, source_hash_kinds(ctx))
    if ctx.mode == "shards":
        log.info("static shard %d of %d: %d of the %d folders", cfg.worker_index, cfg.worker_count,
                 len(work.mine), len(plan.folders))
    done = work.done_now()
    ctx.runtime.progress.plan(sum(1 for j in work.mine if j.unit_key not in done), 0,
                              skipped=sum(1 for j in work.mine if j.unit_key in done))
    passes = Passes(ctx, SCRIPT)
    outcomes = passes.run(work.units)
    failed = [u for u, r in outcomes if isinstance(r, Exception) and not isinstance(r, StopRequested)]
    for unit, result in outcomes:
        if unit in failed:
            log.error("folder %r was not mapped: %s", unit.folder or ROOT_LABEL, result)
    if cfg.dry_run:
        print_plan(plan.generation, [r for u, r in outcomes if u.kind == "folder" and isinstance(r, dict)])
        return EXIT_PARTIAL if failed or passes.plan_errors else EXIT_OK
    if failed or passes.plan_errors:
        log.error("%d folders could not be listed; they have no map yet. Run again to retry them "
                  "(the folders already mapped are kept)", len(failed) + len(passes.plan_errors))
        return EXIT_PARTIAL
    if wait_for_other_shards(ctx, work):
        return EXIT_WAITING
    index = write_index(ctx, plan)
    write_folder_list(records, layout, index)
    warn_if_shrunk(records, layout, index)
    say_complete(index)
    log.info("next: run python_zipper.py")
    return EXIT_OK


def warn_if_shrunk(records: Records, layout: Layout, index: IndexRecord) -> None:
    """A generation that holds far fewer files than the one before it is more often an expired
    token or a failed mount than a real cleanup: say so before anyone propagates deletes."""
    before = read_index(records, layout, index.previous) if index.previous is not None else None
    if before is None:
        return
    now, then = (i.total("files") + i.total("large") for i in (index, before))
    if then >= 10 and now < then / 2:
        log.warning("map generation %d holds %d files, the one before it %d: if SOURCE did not really lose "
                    "them (an expired token, a failed mount, the wrong SOURCE), do not propagate deletes; "
                    "python_unzipper.py with PROPAGATE_DELETES=1 deletes no more than MAX_DELETE",
                    index.generation, now, then)


def change_totals(folders: list[FolderEntry], removed: list[dict]) -> dict:
    """The generation's difference from the previous one, summed over its folders."""
    keys = ("added", "added_bytes", "changed", "changed_bytes", "unchanged", "deleted", "deleted_bytes",
            "dirs_added", "dirs_removed")
    every = [f.changes or {} for f in folders] + [r["changes"] for r in removed]
    totals: dict[str, Any] = {k: sum(int(c.get(k, 0)) for c in every) for k in keys}
    totals["folders_added"] = [f.name for f in folders if f.name and (f.changes or {}).get("new_folder")]
    totals["folders_removed"] = [r["name"] for r in removed]
    return totals


def wait_for_other_shards(ctx: Run, work: Mapping) -> list[FolderJob]:
    """Static shards: the index needs every folder's manifest, and the other workers map theirs.
    Wait while they make progress (a new manifest at least every LEASE_SECONDS); return the
    folders still unmapped when they stop making any (exit 4: run the missing shards)."""
    cfg, runtime = ctx.cfg, ctx.runtime
    missing = [j for j in work.jobs if j.unit_key not in work.mapped()]
    if not missing or ctx.mode != "shards":
        return missing
    wait, longest = 0.5, max(0.5, min(10.0, cfg.lease_seconds / 6))
    last_change = time.monotonic()
    while missing:
        if time.monotonic() - last_change > cfg.lease_seconds:
            shards = sorted({shard_of(j.name, cfg.worker_count) for j in missing})
            log.warning("%d folders of other shards are not mapped yet (first: %r; shards %s); the index "
                        "is written by whichever worker of this stage ends last: run those workers",
                        len(missing), missing[0].name, ", ".join(map(str, shards)))
            return missing
        log.info("waiting for %d folders of other shards (first: %r)", len(missing), missing[0].name)
        runtime.stop.wait(wait)
        runtime.check()
        wait = min(longest, wait * 2)
        now = [j for j in work.jobs if j.unit_key not in work.mapped()]
        if len(now) < len(missing):
            last_change = time.monotonic()
        missing = now
    return missing


def print_plan(gen: int, planned: list[dict]) -> None:
    """DRY_RUN: what a real run would record, to stdout."""
    out.info(f"plan for map generation {gen} (DRY_RUN: nothing was written)\n")
    rows = [("folder", "files", "bytes", "parts", "large files", "empty dirs")]
    for s in sorted(planned, key=lambda s: s["name"]):
        rows.append(((s["name"] or ROOT_LABEL)[:40], str(s["files"]), human_bytes(s["bytes"]),
                     str(len(s["parts"])), f"{s['large']} ({human_bytes(s['large_bytes'])})", str(s["dirs"])))
    rows.append(("TOTAL", str(sum(s["files"] for s in planned)), human_bytes(sum(s["bytes"] for s in planned)),
                 str(sum(len(s["parts"]) for s in planned)),
                 f"{sum(s['large'] for s in planned)} ({human_bytes(sum(s['large_bytes'] for s in planned))})",
                 str(sum(s["dirs"] for s in planned))))
    for line in table_lines(rows):
        out.info(line + "\n")
    for s in planned:
        for path, size in s.get("large_files", []):
            out.info(f"large file {s['name'] + '/' if s['name'] else ''}{path} ({human_bytes(size)}) "
                      "goes SOURCE to DESTINATION directly\n")


def write_folder_list(records: Records, layout: Layout, index: IndexRecord) -> None:
    """``_index/folder_list.txt``: the real folder names of the latest generation."""
    body = "\n".join(f.name for f in index.folders if f.name).encode("utf-8")
    current = records.get_bytes(layout.folder_list)
    if current != body:
        records.put_bytes(layout.folder_list, body, content_type="text/plain; charset=utf-8")


def main(argv: Sequence[str] | None = None, environ: dict | None = None) -> int:
    return run_script(SCRIPT, __doc__, run, argv, environ, options=("--status",))


if __name__ == "__main__":
    sys.exit(main())
