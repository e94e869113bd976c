"""bench.py: time the migration pipeline against cp -a, rclone copy through S3 and rclone archive.

Run it through ``bash bench/run.sh [options]`` (which prepares .venv and puts rclone on PATH).

In one run and on the same generated data it times, per data set:

  cp -a                              the floor
  rclone copy via S3                 SOURCE -> hub -> DESTINATION, --transfers 8 (the baseline)
  rclone archive create / extract    SOURCE -> one zip on the hub -> DESTINATION
  pipeline                           master_mapper.py, python_zipper.py, python_unzipper.py

The hub is ``rclone serve s3`` on 127.0.0.1; every S3 client reaches it through a counting
proxy (bench/s3proxy.py, its own process), so each method's S3 requests are counted. Every
output tree is compared with SOURCE (paths, sizes, SHA-256, mtime within 1 s). It prints one
table per data set and a targets section, and writes the same as JSON (--out).

Optional modes: --remotes (SOURCE and DESTINATION as rclone S3 remotes, each on its own
``rclone serve s3``, against ``rclone copy`` SOURCE -> DESTINATION direct), --delay-ms N (N ms
added to every S3 request by a delaying proxy in front of the hub, against rclone copy through
the same proxy), --mapper-million (the mapper alone on a SOURCE of many empty files).

Standard library plus boto3 only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
FIXED_MTIME = 1577934245            # 2020-01-02 03:04:05 UTC: every file's mtime is this plus < 1 year
BUCKET = "hub"
SCRIPTS = (("mapper", "master_mapper.py"), ("zipper", "python_zipper.py"),
           ("unzipper", "python_unzipper.py"))
# Pipeline variables: removed from the inherited environment so only --env sets them.
PIPELINE_VARS = ("SOURCE", "DESTINATION", "S3_BUCKET", "S3_PREFIX", "S3_ENDPOINT", "WORK_DIR",
                 "LARGE_FILE_THRESHOLD_GB", "FORCE_RESCAN", "SPLIT_THRESHOLD", "MAX_ZIP_SIZE_GB",
                 "MAX_PARALLEL_WORKERS", "DOWNLOAD_THREADS", "UPLOAD_THREADS", "SKIP_UPLOAD",
                 "LOCAL_OUTPUT_DIR", "MAX_ZIP_BOMB_RATIO", "DISK_LIMIT_PERCENT",
                 "DISK_BACKPRESSURE_PERCENT", "S3_MAX_RETRIES", "MAX_RETRY_DURATION", "S3_CHECKSUMS",
                 "INSTANCE_LOCK_TIMEOUT", "LOG_LEVEL", "LOG_FORMAT", "WORKER_ID", "PROGRESS_INTERVAL",
                 "LEASE_SECONDS", "WORKER_INDEX", "DRY_RUN", "PROPAGATE_DELETES", "WORKER_COUNT",
                 "COMMAND_TIMEOUT", "RCLONE_BIN", "MIGRATION_TEST_DISK_USAGE_FILE", "UPSTREAM_WAIT",
                 "VERIFY_DOWNLOAD", "MAX_DELETE", "JOB_COMPLETION_INDEX")
PIPELINE_DEFAULTS = {"LARGE_FILE_THRESHOLD_GB": "20", "MAX_ZIP_SIZE_GB": "20", "SPLIT_THRESHOLD": "1000",
                     "MAX_PARALLEL_WORKERS": "2", "DOWNLOAD_THREADS": "6", "UPLOAD_THREADS": "6"}
# Issue 19 sets the ratios (limit, aim) for the stages started together; issue 6 the rest.
TARGETS = {"small_ratio": 0.35, "large_ratio": 1.2, "large_ratio_aim": 1.0, "requests_per_1000_small": 5.0,
           "requests_per_part": 25.0, "work_dir_factor": 1.1, "script_rss_mib": 150.0,
           "mapper_million_rss_mib": 300.0, "remotes_ratio": 1.3, "remotes_ratio_aim": 1.2,
           "delay_ratio": 0.3, "delay_10ms_ratio": 0.25}
# The order of the README's command: python python_unzipper.py & python python_zipper.py & python master_mapper.py
TOGETHER_ORDER = ("unzipper", "zipper", "mapper")
FIRST_FILE_POLL_S = 0.2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes we start: registered so that they all end on exit, also on Ctrl-C / SIGTERM.

class Registry:
    def __init__(self) -> None:
        self.services: list[tuple[str, subprocess.Popen]] = []   # servers and proxies
        self.running: dict[int, "Sampler | None"] = {}           # pid -> sampler of a timed command
        self.procs: dict[int, subprocess.Popen] = {}

    def add_service(self, name: str, proc: subprocess.Popen) -> None:
        self.services.append((name, proc))

    def stop_service(self, proc: subprocess.Popen) -> None:
        _end(proc, grace=5)
        self.services = [(n, p) for n, p in self.services if p is not proc]

    def cleanup(self) -> None:
        for pid, proc in list(self.procs.items()):
            if proc.poll() is None:
                log(f"ending running command pid {pid}")
                sampler = self.running.get(pid)
                descendants = set(sampler.descendants_seen) if sampler else set()
                _end(proc, grace=20)
                for d in descendants:          # rclone children the script put in their own groups
                    try:
                        os.kill(d, signal.SIGKILL)
                    except OSError:
                        pass
        for _name, proc in reversed(self.services):
            _end(proc, grace=5)
        self.services.clear()


def _end(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)   # every process we start leads its own group
    except OSError:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait(5)


REG = Registry()


# ---------------------------------------------------------------------------------------------
# Servers and proxies

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} before it listened")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")
            time.sleep(0.1)


class S3Server:
    """``rclone serve s3`` on 127.0.0.1 over a data directory (buckets are its subdirectories)."""

    def __init__(self, name: str, data_dir: str, rclone: str, log_dir: str, buckets: tuple[str, ...] = ()):
        self.name = name
        self.data_dir = data_dir
        self.key = f"bench-{name}-{secrets.token_hex(4)}"
        self.secret = secrets.token_hex(16)
        for b in buckets:
            os.makedirs(os.path.join(data_dir, b), exist_ok=True)
        port = free_port()
        env = clean_env()
        env["RCLONE_AUTH_KEY"] = f'"{self.key},{self.secret}"'
        self.log_path = os.path.join(log_dir, f"server-{name}.log")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}",
                                          "--config", os.devnull, data_dir], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        REG.add_service(f"server {name}", self.proc)
        wait_port(port, self.proc, f"rclone serve s3 ({name})")
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        REG.stop_service(self.proc)

    def rclone_env(self, remote: str, endpoint: str | None = None) -> dict[str, str]:
        """Variables that define rclone remote ``remote`` (lower case) on this server."""
        p = f"RCLONE_CONFIG_{remote.upper()}_"
        return {p + "TYPE": "s3", p + "PROVIDER": "Other", p + "ENDPOINT": endpoint or self.url,
                p + "ACCESS_KEY_ID": self.key, p + "SECRET_ACCESS_KEY": self.secret,
                p + "REGION": "us-east-1", p + "FORCE_PATH_STYLE": "true"}

    def boto3(self):
        import boto3
        from botocore.config import Config as BotoConfig
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=BotoConfig(s3={"addressing_style": "path"},
                                              retries={"max_attempts": 3, "mode": "standard"}))


class Proxy:
    """bench/s3proxy.py in its own process in front of ``upstream``: counts, optionally delays."""

    def __init__(self, name: str, upstream: str, log_dir: str, delay_ms: float = 0.0, request_log: bool = False):
        self.name = name
        self.delay_ms = delay_ms
        extra = ["--request-log", os.path.join(log_dir, f"requests-{name}.log")] if request_log else []
        with open(os.path.join(log_dir, f"proxy-{name}.log"), "ab") as err:
            self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "s3proxy.py"),
                                          "--upstream", upstream, "--delay-ms", str(delay_ms), *extra],
                                         stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        REG.add_service(f"proxy {name}", self.proc)
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"proxy {name} did not start (said {line!r})")
        port = int(line.split()[1])
        wait_port(port, self.proc, f"proxy {name}")
        self.url = f"http://127.0.0.1:{port}"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/__bench__/stats", timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        REG.stop_service(self.proc)


def stats_diff(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    out: dict = {"total": after["total"] - before["total"]}
    for k in ("by_method", "by_status"):
        keys = set(before[k]) | set(after[k])
        d = {m: after[k].get(m, 0) - before[k].get(m, 0) for m in sorted(keys)}
        out[k] = {m: v for m, v in d.items() if v}
    for k in ("bytes_in", "bytes_out", "errors", "aborted"):
        out[k] = after.get(k, 0) - before.get(k, 0)
    return out


def stats_sum(items: list[dict | None]) -> dict | None:
    items = [i for i in items if i is not None]
    if not items:
        return None
    out: dict = {"total": 0, "by_method": {}, "by_status": {}, "bytes_in": 0, "bytes_out": 0, "errors": 0,
                 "aborted": 0}
    for i in items:
        for k in ("total", "bytes_in", "bytes_out", "errors", "aborted"):
            out[k] += i.get(k, 0)
        for k in ("by_method", "by_status"):
            for m, v in i.get(k, {}).items():
                out[k][m] = out[k].get(m, 0) + v
    return out


# ---------------------------------------------------------------------------------------------
# Sampling: peak RSS of a process and its descendants, peak bytes under a folder.

PAGE = os.sysconf("SC_PAGE_SIZE")


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                for f in fields:
                    if line.startswith(f.encode() + b":"):
                        out[f] = int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (no /proc/<pid>/task/*/children on this kernel)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
            out[int(name)] = int(data[data.rindex(b")") + 2:].split(None, 2)[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _children() -> dict[int, list[int]]:
    """pid -> its child pids, from one scan of /proc."""
    kids: dict[int, list[int]] = {}
    for p, pp in _parents().items():
        kids.setdefault(pp, []).append(p)
    return kids


def tree_bytes(path: str) -> tuple[int, int]:
    """(bytes, files) under ``path``: apparent sizes of every non-directory entry, nothing excluded."""
    total = files = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            it = os.scandir(p)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        total += e.stat(follow_symlinks=False).st_size
                        files += 1
                except OSError:
                    continue
    return total, files


class Sampler:
    """Polls a process: VmRSS/VmHWM of the process itself every ``rss_s``, the summed VmRSS of
    its descendants (rclone children), and, when ``watch_dir`` is given, the bytes under it
    every ``walk_s``."""

    def __init__(self, pid: int, watch_dir: str | None = None, rss_s: float = 0.05, walk_s: float = 0.15,
                 *, sample_rss: bool = True):
        self.pid = pid
        self.watch_dir = watch_dir
        self.rss_s = rss_s
        self.walk_s = walk_s
        self.peak_rss = 0
        self.peak_children = 0
        self.peak_tree = 0
        self.peak_dir = 0
        self.peak_dir_files = 0
        self.descendants_seen: set[int] = set()
        self.children_names: set[str] = set()
        self.samples = 0
        self.walks = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss_loop, daemon=True)] if sample_rss else []
        if watch_dir:
            self._threads.append(threading.Thread(target=self._walk_loop, daemon=True))

    def start(self) -> "Sampler":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        if self.watch_dir:       # one last reading after the process ended
            b, f = tree_bytes(self.watch_dir)
            self.peak_dir = max(self.peak_dir, b)
            self.peak_dir_files = max(self.peak_dir_files, f)

    def _rss_loop(self) -> None:
        while not self._stop.is_set():
            self.take(_children())
            self._stop.wait(self.rss_s)

    def take(self, kids: dict[int, list[int]]) -> None:
        """One sample: own VmRSS/VmHWM, and the summed VmRSS of the descendants found in ``kids``."""
        st = _status_kib(self.pid, ("VmRSS", "VmHWM"))
        self.peak_rss = max(self.peak_rss, st.get("VmRSS", 0), st.get("VmHWM", 0))
        todo, child_sum = list(kids.get(self.pid, [])), 0
        while todo:
            d = todo.pop()
            todo.extend(kids.get(d, []))
            child_sum += _rss(d)
            if d not in self.descendants_seen:
                self.descendants_seen.add(d)
                try:
                    with open(f"/proc/{d}/comm") as fh:
                        self.children_names.add(fh.read().strip())
                except OSError:
                    pass
        self.peak_children = max(self.peak_children, child_sum)
        self.peak_tree = max(self.peak_tree, st.get("VmRSS", 0) + child_sum)
        self.samples += 1

    def _walk_loop(self) -> None:
        while not self._stop.is_set():
            b, f = tree_bytes(self.watch_dir)
            self.peak_dir = max(self.peak_dir, b)
            self.peak_dir_files = max(self.peak_dir_files, f)
            self.walks += 1
            self._stop.wait(self.walk_s)


class GroupSampler:
    """Several processes started together, sampled by one thread (one scan of /proc per tick for
    all of them, so three stages cost the machine what one costs under ``Sampler``); the bytes
    under their shared ``watch_dir``. ``samplers[pid]`` has the same peak fields as ``Sampler``."""

    def __init__(self, pids: list[int], watch_dir: str | None, rss_s: float, walk_s: float):
        self.samplers = {pid: Sampler(pid, None, rss_s, walk_s) for pid in pids}
        self.walker = Sampler(0, watch_dir, rss_s, walk_s, sample_rss=False) if watch_dir else None
        self.rss_s = rss_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "GroupSampler":
        self._thread.start()
        if self.walker:
            self.walker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.walker:
            self.walker.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            kids = _children()
            for sm in self.samplers.values():
                sm.take(kids)
            self._stop.wait(self.rss_s)


class FirstFile:
    """Polls DESTINATION every FIRST_FILE_POLL_S from ``t0`` until ``found()`` says a file of SOURCE
    is there whole; ``after_s`` is then the seconds from ``t0`` (None if never seen)."""

    def __init__(self, found, t0: float):
        self.found = found
        self.t0 = t0
        self.after_s: float | None = None
        self.polls = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "FirstFile":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.polls += 1
            try:
                if self.found():
                    self.after_s = time.perf_counter() - self.t0
                    return
            except Exception as exc:  # a listing that failed: try again at the next poll
                self.error = repr(exc)
            self._stop.wait(FIRST_FILE_POLL_S)


def first_local_file(root: str, snap: dict):
    """found() for a local DESTINATION: some file with a SOURCE path and SOURCE size."""
    def found() -> bool:
        for dirpath, _dirs, names in os.walk(root):
            for n in names:
                rel = os.path.relpath(os.path.join(dirpath, n), root)
                if rel in snap:
                    try:
                        if os.stat(os.path.join(dirpath, n)).st_size == snap[rel][0]:
                            return True
                    except OSError:
                        continue
        return False
    return found


def first_remote_file(server: "S3Server", bucket: str, snap: dict):
    """found() for a DESTINATION on one of our S3 servers: some key with a SOURCE path and size
    (listed on the server itself, not through the counting proxy)."""
    s3 = server.boto3()

    def found() -> bool:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                if o["Key"] in snap and o["Size"] == snap[o["Key"]][0]:
                    return True
        return False
    return found


# ---------------------------------------------------------------------------------------------
# Running one timed command

def clean_env() -> dict[str, str]:
    """The inherited environment without anything that would change a method's behaviour."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RCLONE_", "AWS_")) and k not in PIPELINE_VARS}
    return env


class Runner:
    def __init__(self, log_dir: str, rss_s: float, walk_s: float, timeout_s: float):
        self.log_dir = log_dir
        self.rss_s = rss_s
        self.walk_s = walk_s
        self.timeout_s = timeout_s

    def run(self, label: str, argv: list[str], env: dict[str, str], *, proxy: Proxy | None = None,
            watch_dir: str | None = None, cwd: str | None = None) -> dict:
        log_path = os.path.join(self.log_dir, f"{label}.log")
        before = proxy.stats() if proxy else None
        with open(log_path, "wb") as out:
            out.write(("$ " + " ".join(argv) + "\n").encode())
            out.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            REG.procs[proc.pid] = proc
            sampler = Sampler(proc.pid, watch_dir, self.rss_s, self.walk_s).start()
            REG.running[proc.pid] = sampler
            try:
                rc = proc.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                log(f"{label}: still running after {self.timeout_s:.0f}s; ending it")
                _end(proc, grace=20)
                rc = proc.returncode if proc.returncode is not None else -9
            wall = time.perf_counter() - t0
            sampler.stop()
            REG.procs.pop(proc.pid, None)
            REG.running.pop(proc.pid, None)
        after = proxy.stats() if proxy else None
        result = {"label": label, "argv": argv, "rc": rc, "wall_s": wall,
                  "peak_rss_bytes": sampler.peak_rss, "peak_children_rss_bytes": sampler.peak_children,
                  "peak_tree_rss_bytes": sampler.peak_tree, "children": sorted(sampler.children_names),
                  "rss_samples": sampler.samples, "log": log_path,
                  "s3": stats_diff(before, after)}
        if watch_dir:
            result["peak_work_dir_bytes"] = sampler.peak_dir
            result["peak_work_dir_files"] = sampler.peak_dir_files
            result["work_dir_walks"] = sampler.walks
        if rc != 0:
            result["tail"] = tail(log_path)
            log(f"{label}: exit code {rc}; last lines of {log_path}:\n" + result["tail"])
        return result


    def run_together(self, label: str, stages: list[tuple[str, list[str]]], env: dict[str, str], *,
                     proxy: Proxy, watch_dir: str, cwd: str, first_file=None) -> dict:
        """Start every stage at one instant, wait for all (each one's wall is from the common start
        to its own exit); one S3 count for all of them, the first file at DESTINATION if asked."""
        before = proxy.stats()
        outs, procs = [], []
        t0 = time.perf_counter()
        probe = FirstFile(first_file, t0).start() if first_file else None
        try:
            for stage, argv in stages:
                out = open(os.path.join(self.log_dir, f"{label}-{stage}.log"), "wb")
                outs.append(out)
                proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                REG.procs[proc.pid] = proc
                procs.append((stage, argv, proc))
            group = GroupSampler([p.pid for _s, _a, p in procs], watch_dir, self.rss_s, self.walk_s).start()
            for pid, sm in group.samplers.items():
                REG.running[pid] = sm
            ended = self._wait_all(label, [p for _s, _a, p in procs], t0)
            wall = time.perf_counter() - t0
            group.stop()
        finally:
            if probe:
                probe.stop()
            for out in outs:
                out.close()
        steps = []
        for stage, argv, proc in procs:
            sm = group.samplers[proc.pid]
            REG.procs.pop(proc.pid, None)
            REG.running.pop(proc.pid, None)
            log_path = os.path.join(self.log_dir, f"{label}-{stage}.log")
            st = {"label": f"{label}-{stage}", "step": stage, "argv": argv, "rc": proc.returncode,
                  "wall_s": ended[proc.pid], "peak_rss_bytes": sm.peak_rss,
                  "peak_children_rss_bytes": sm.peak_children, "peak_tree_rss_bytes": sm.peak_tree,
                  "children": sorted(sm.children_names), "rss_samples": sm.samples, "log": log_path}
            if proc.returncode != 0:
                st["tail"] = tail(log_path)
                log(f"{label}-{stage}: exit code {proc.returncode}; last lines of {log_path}:\n" + st["tail"])
            steps.append(st)
        result = {"wall_s": wall, "steps": steps, "s3": stats_diff(before, proxy.stats()),
                  "peak_work_dir_bytes": group.walker.peak_dir if group.walker else 0}
        if probe:
            result["first_file_s"] = probe.after_s
            result["first_file_polls"] = probe.polls
            if probe.error:
                result["first_file_error"] = probe.error
        return result

    def _wait_all(self, label: str, procs: list[subprocess.Popen], t0: float) -> dict[int, float]:
        """pid -> seconds from ``t0`` to its exit; all are ended once ``timeout_s`` has passed."""
        ended: dict[int, float] = {}
        deadline = t0 + self.timeout_s
        while len(ended) < len(procs):
            for proc in procs:
                if proc.pid not in ended and proc.poll() is not None:
                    ended[proc.pid] = time.perf_counter() - t0
            if time.perf_counter() > deadline:
                log(f"{label}: still running after {self.timeout_s:.0f}s; ending it")
                for proc in procs:
                    if proc.pid not in ended:
                        _end(proc, grace=20)
                        ended[proc.pid] = time.perf_counter() - t0
            time.sleep(0.02)
        return ended


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 16384))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Data sets (deterministic: seeded sizes, contents, names; mtimes at a fixed old date)

def make_folders(n_folders: int, rng: random.Random, max_depth: int = 4) -> list[str]:
    """``n_folders`` relative folder paths: about one in 15 at the top level, the rest nested below."""
    n_top = 1 if n_folders < 2 else max(2, round(n_folders / 15))
    folders = [f"dir_{i:03d}" for i in range(n_top)]
    candidates = list(folders)
    k = 0
    while len(folders) < n_folders:
        parent = rng.choice(candidates)
        child = f"{parent}/sub_{k:04d}"
        k += 1
        folders.append(child)
        if child.count("/") + 1 < max_depth:
            candidates.append(child)
    return folders


class Writer:
    def __init__(self, root: str, seed: int):
        self.root = root
        self.rng = random.Random(seed)
        self.pool = random.Random(seed ^ 0x5EED).randbytes(16 * MIB)
        self.files = 0
        self.bytes = 0

    def mtime(self) -> int:
        return FIXED_MTIME + self.rng.randrange(365 * 86400)

    def write(self, rel: str, size: int, tag: str) -> None:
        path = os.path.join(self.root, rel)
        header = hashlib.sha256(tag.encode()).digest()[:16]   # unique per file
        with open(path, "wb") as fh:
            left, first = size, True
            while left > 0:
                n = min(left, MIB)
                if first:
                    off = self.rng.randrange(len(self.pool) - n)
                    chunk = (header + self.pool[off:off + n - 16])[:n] if n > 16 else header[:n]
                    first = False
                else:
                    off = self.rng.randrange(len(self.pool) - n)
                    chunk = self.pool[off:off + n]
                fh.write(chunk)
                left -= n
        m = self.mtime()
        os.utime(path, (m, m))
        self.files += 1
        self.bytes += size


def gen_small(w: Writer, n_files: int, n_folders: int, min_kib: int, max_kib: int) -> list[str]:
    n_folders = max(1, min(n_folders, n_files))
    folders = make_folders(n_folders, w.rng)
    for f in folders:
        os.makedirs(os.path.join(w.root, f), exist_ok=True)
    for i in range(n_files):
        # every folder gets a file first (no empty directories), then folders at random
        folder = folders[i] if i < len(folders) else folders[w.rng.randrange(len(folders))]
        size = w.rng.randint(min_kib * KIB, max_kib * KIB)
        w.write(f"{folder}/file_{i:06d}.bin", size, f"small/{i}")
    return folders


def gen_large(w: Writer, n_files: int, size: int, folders: list[str] | None) -> None:
    if folders is None:   # the large set: up to 8 top-level folders, every other file one level down
        n_top = max(1, min(8, n_files))
        folders = [f"big_{i:02d}" for i in range(n_top)]
    for i in range(n_files):
        folder = folders[i % len(folders)]
        if i % 2 and folders[0].startswith("big_"):
            folder = f"{folder}/nested"
        os.makedirs(os.path.join(w.root, folder), exist_ok=True)
        w.write(f"{folder}/large_{i:03d}.bin", size, f"large/{i}")


def generate_set(name: str, root: str, args: argparse.Namespace) -> dict:
    os.makedirs(root)
    t0 = time.perf_counter()
    seed = args.seed * 1000 + {"small": 1, "large": 2, "mixed": 3}[name]
    w = Writer(root, seed)
    large_size = int(args.large_mib * MIB)
    folders = None
    if name in ("small", "mixed") and args.small:
        folders = gen_small(w, args.small, args.folders, 1, 64)
    if name in ("large", "mixed") and args.large:
        tops = sorted({f.split("/")[0] for f in folders}) if folders else None
        gen_large(w, args.large, large_size, tops)
    dirs = sum(len(d) for _r, d, _f in os.walk(root))
    return {"files": w.files, "bytes": w.bytes, "folders": dirs,
            "top_level_folders": len(os.listdir(root)), "generate_s": time.perf_counter() - t0}


def gen_empty_files(root: str, n: int, per_leaf: int = 1000, leaves_per_top: int = 20) -> dict:
    """``n`` empty files, cheaply: 1,000 per leaf folder, 20 leaves per top-level folder.

    They are hard links of one empty file (outside SOURCE) whose mtime is the fixed date: a link
    costs about a tenth of creating a file and setting its mtime on ext4, and rclone lists every
    link as a file of its own."""
    t0 = time.perf_counter()
    leaves = max(1, -(-n // per_leaf))
    made = 0
    seed_file = ""
    for leaf in range(leaves):
        d = os.path.join(root, f"top_{leaf // leaves_per_top:03d}", f"leaf_{leaf % leaves_per_top:02d}")
        os.makedirs(d)
        for i in range(min(per_leaf, n - made)):
            if made % 60000 == 0:     # ext4 allows 65,000 links to one inode
                seed_file = os.path.join(os.path.dirname(root), f"empty-file-{made // 60000}")
                with open(seed_file, "wb"):
                    pass
                os.utime(seed_file, (FIXED_MTIME, FIXED_MTIME))
            os.link(seed_file, os.path.join(d, f"e{i:04d}"))
            made += 1
    return {"files": made, "bytes": 0, "leaf_folders": leaves,
            "top_level_folders": len(os.listdir(root)), "generate_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# Checking an output tree against SOURCE

def snapshot(root: str) -> dict[str, tuple[int, float, str]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while True:
                    b = fh.read(MIB)
                    if not b:
                        break
                    h.update(b)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime, h.hexdigest())
    return out


def check_tree(source: dict, out_root: str, *, check_mtime: bool = True) -> dict:
    t0 = time.perf_counter()
    if not os.path.isdir(out_root):
        return {"ok": False, "files": 0, "summary": f"no output folder {out_root}", "examples": []}
    dst = snapshot(out_root)
    missing = [p for p in source if p not in dst]
    extra = [p for p in dst if p not in source]
    content = [p for p in source if p in dst and (source[p][0] != dst[p][0] or source[p][2] != dst[p][2])]
    mtime = [p for p in source if p in dst and p not in content and abs(source[p][1] - dst[p][1]) > 1.0]
    problems = missing or extra or content or (mtime if check_mtime else [])
    examples = ([f"missing {p}" for p in missing[:3]] + [f"extra {p}" for p in extra[:3]]
                + [f"content {p}" for p in content[:3]]
                + [f"mtime {p} ({dst[p][1] - source[p][1]:+.1f}s)" for p in mtime[:3]])
    bits = []
    for what, lst in (("missing", missing), ("extra", extra), ("differ", content), ("mtime", mtime)):
        if lst:
            bits.append(f"{len(lst)} {what}")
    return {"ok": not problems, "files": len(dst), "missing": len(missing), "extra": len(extra),
            "content_differs": len(content), "mtime_differs": len(mtime), "mtime_checked": check_mtime,
            "summary": "ok" if not problems else ", ".join(bits), "examples": examples,
            "check_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# The benchmark

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rclone = shutil.which("rclone") or os.path.join(os.path.dirname(sys.executable), "rclone")
        if not os.access(self.rclone, os.X_OK):
            raise SystemExit("bench: rclone not found (run through bench/run.sh)")
        self.work = args.workdir
        self.out_path = os.path.abspath(args.out)
        self.log_dir = os.path.splitext(self.out_path)[0] + "-logs"
        self.runner = Runner(self.log_dir, args.rss_interval, args.walk_interval, args.timeout)
        self.sections: list[dict] = []
        self.extra: dict = {}
        self.hub: S3Server | None = None
        self.proxy: Proxy | None = None
        self.failures: list[str] = []
        self.current = ""          # the data set and mode being run, for the failure list

    # --- environments
    def base_env(self) -> dict[str, str]:
        env = clean_env()
        env["PATH"] = os.path.dirname(self.rclone) + os.pathsep + env.get("PATH", "")
        env["RCLONE_CONFIG"] = os.devnull
        return env

    def pipeline_settings(self) -> dict[str, str]:
        s = dict(PIPELINE_DEFAULTS)
        s.update(self.args.env_pairs)
        return s

    def pipeline_env(self, *, source: str, destination: str, prefix: str, work_dir: str,
                     endpoint: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = self.base_env()
        env.update({"S3_ENDPOINT": endpoint, "S3_BUCKET": BUCKET, "S3_PREFIX": prefix,
                    "AWS_ACCESS_KEY_ID": self.hub.key, "AWS_SECRET_ACCESS_KEY": self.hub.secret,
                    "AWS_REGION": "us-east-1", "SOURCE": source, "DESTINATION": destination,
                    "WORK_DIR": work_dir})
        env.update(self.args.env_pairs)
        env.update(extra or {})
        return env

    def part_bound(self, set_bytes: int) -> dict:
        s = self.pipeline_settings()
        part = int(float(s["MAX_ZIP_SIZE_GB"]) * GIB)
        workers = int(s["MAX_PARALLEL_WORKERS"])
        return {"part_size_bytes": part, "parts_in_flight": workers, "set_bytes": set_bytes,
                "bound_bytes": int(TARGETS["work_dir_factor"] * min(part, set_bytes) * workers)}

    # --- helpers
    def purge_hub(self, path: str) -> None:
        """Delete hub objects under ``path`` (bucket-relative) through the server, not the proxy."""
        env = self.base_env()
        env.update(self.hub.rclone_env("hubdirect"))
        subprocess.run([self.rclone, "purge", f"hubdirect:{BUCKET}/{path}"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def map_info(self, prefix: str) -> dict:
        """Parts the mapper planned (from the latest index.json on the hub), for the report."""
        try:
            s3 = self.hub.boto3()
            keys = []
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "_map/"):
                keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith("/index.json")]
            if not keys:
                return {}
            index = json.loads(s3.get_object(Bucket=BUCKET, Key=sorted(keys)[-1])["Body"].read())
            parts = [p for f in index.get("folders", []) for p in (f.get("part_table") or [])]
            return {"generation": index.get("generation"), "folders": len(index.get("folders", [])),
                    "totals": index.get("totals"), "parts": len(parts),
                    "largest_part_bytes": max((p.get("bytes", 0) for p in parts), default=0),
                    "largest_part_files": max((p.get("files", 0) for p in parts), default=0)}
        except Exception as exc:  # informational only
            return {"error": repr(exc)}

    def finish_method(self, m: dict, files: int, nbytes: int) -> dict:
        wall = m.get("wall_s")
        if wall:
            m["files_per_s"] = files / wall
            m["mib_per_s"] = nbytes / MIB / wall
        s3 = m.get("s3")
        if s3 is not None and files:
            m["requests_per_1000_files"] = s3["total"] * 1000.0 / files
        return m

    def method_from_steps(self, name: str, kind: str, steps: list[dict], files: int, nbytes: int) -> dict:
        m = {"method": name, "kind": kind, "steps": steps,
             "rc": next((s["rc"] for s in steps if s["rc"] != 0), 0),
             "wall_s": sum(s["wall_s"] for s in steps),
             "peak_rss_bytes": max((s["peak_rss_bytes"] for s in steps), default=0),
             "peak_children_rss_bytes": max((s["peak_children_rss_bytes"] for s in steps), default=0),
             "s3": stats_sum([s.get("s3") for s in steps]) if any(s.get("s3") for s in steps) else None}
        if any("peak_work_dir_bytes" in s for s in steps):
            m["peak_work_dir_bytes"] = max(s.get("peak_work_dir_bytes", 0) for s in steps)
        m["status"] = "ok" if m["rc"] == 0 else "failed"
        for s in steps:
            self.finish_method(s, files, nbytes)
        return self.finish_method(m, files, nbytes)

    def verify(self, m: dict, source_snap: dict, out_root: str) -> None:
        if m["status"] == "failed":
            m["tree_check"] = check_tree(source_snap, out_root) if os.path.isdir(out_root) else \
                {"ok": False, "summary": "not run (command failed)"}
        else:
            m["tree_check"] = check_tree(source_snap, out_root)
        tc = m["tree_check"]
        log(f"  {m['method']}: {m.get('wall_s', 0):.1f}s, tree {tc['summary']}")
        if not tc["ok"] or m["status"] == "failed":
            self.failures.append(f"{self.current}: {m['method']}: {m['status']}"
                                 + (f" (exit {m.get('rc')})" if m['status'] == 'failed' else "")
                                 + f", tree {tc['summary']}")
        if not self.args.keep:
            shutil.rmtree(out_root, ignore_errors=True)

    # --- methods
    def m_cp(self, label: str, src: str, runs: str, snap: dict, files: int, nbytes: int) -> dict:
        dst = os.path.join(runs, "cp")
        step = self.runner.run(f"{label}-cp", ["cp", "-a", src, dst], self.base_env())
        m = self.method_from_steps("cp -a", "cp", [step], files, nbytes)
        self.verify(m, snap, dst)
        return m

    def m_rclone_s3(self, label: str, src: str, runs: str, snap: dict, files: int, nbytes: int, *,
                    proxy: Proxy | None, name: str, hub_path: str) -> dict:
        dst = os.path.join(runs, hub_path.replace("/", "_"))
        env = self.base_env()
        env.update(self.hub.rclone_env("hub", proxy.url if proxy else self.hub.url))
        t = ["--transfers", str(self.args.transfers)]
        steps = [self.runner.run(f"{label}-{hub_path.replace('/', '_')}-up",
                                 [self.rclone, "copy", src, f"hub:{BUCKET}/{hub_path}", *t], env, proxy=proxy)]
        steps[0]["step"] = "SOURCE -> S3"
        if steps[0]["rc"] == 0:
            steps.append(self.runner.run(f"{label}-{hub_path.replace('/', '_')}-down",
                                         [self.rclone, "copy", f"hub:{BUCKET}/{hub_path}", dst, *t], env,
                                         proxy=proxy))
            steps[1]["step"] = "S3 -> DESTINATION"
        m = self.method_from_steps(name, "rclone-copy", steps, files, nbytes)
        m["transfers"] = self.args.transfers
        self.verify(m, snap, dst)
        self.purge_hub(hub_path)
        return m

    def m_archive(self, label: str, src: str, runs: str, snap: dict, files: int, nbytes: int) -> dict:
        name = "rclone archive create/extract"
        probe = subprocess.run([self.rclone, "archive", "create", "--help"], capture_output=True,
                               env=self.base_env())
        if probe.returncode != 0:
            reason = "this rclone has no `archive create` subcommand: " + \
                     (probe.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            return {"method": name, "kind": "archive", "status": "n/a", "reason": reason}
        dst = os.path.join(runs, "archive")
        hub_path = f"{label}/archive"
        key = f"hub:{BUCKET}/{hub_path}/tree.{self.args.archive_format}"
        env = self.base_env()
        env.update(self.hub.rclone_env("hub", self.proxy.url))
        steps = [self.runner.run(f"{label}-archive-create", [self.rclone, "archive", "create", src, key], env,
                                 proxy=self.proxy)]
        steps[0]["step"] = "create SOURCE -> S3"
        if steps[0]["rc"] == 0:
            steps.append(self.runner.run(f"{label}-archive-extract", [self.rclone, "archive", "extract", key, dst],
                                         env, proxy=self.proxy))
            steps[1]["step"] = "extract S3 -> DESTINATION"
        m = self.method_from_steps(name, "archive", steps, files, nbytes)
        m["format"] = self.args.archive_format
        self.verify(m, snap, dst)
        self.purge_hub(hub_path)
        return m

    def m_pipeline(self, label: str, *, source: str, destination: str, out_root: str, runs: str, snap: dict,
                   files: int, nbytes: int, endpoint: str, proxy: Proxy, name: str = "pipeline, one after another",
                   extra_env: dict | None = None, stages=SCRIPTS) -> dict:
        work_dir = os.path.join(runs, "pipeline-work")
        os.makedirs(work_dir)
        prefix = f"{label}/pipeline/"
        env = self.pipeline_env(source=source, destination=destination, prefix=prefix, work_dir=work_dir,
                                endpoint=endpoint, extra=extra_env)
        steps = []
        for stage, script in stages:
            r = self.runner.run(f"{label}-{stage}", [sys.executable, os.path.join(REPO, script)], env,
                                proxy=proxy, watch_dir=work_dir, cwd=REPO)
            r["step"] = stage
            r["script"] = script
            steps.append(r)
            if r["rc"] != 0:
                break
        m = self.method_from_steps(name, "pipeline", steps, files, nbytes)
        m["settings"] = {k: env.get(k, PIPELINE_DEFAULTS.get(k)) for k in
                         sorted(set(PIPELINE_DEFAULTS) | set(self.args.env_pairs))}
        m["map"] = self.map_info(prefix)
        m["work_dir_bound"] = self.part_bound(nbytes)
        lp = m["map"].get("largest_part_bytes")
        if lp:
            m["work_dir_bound"]["largest_planned_part_bytes"] = lp
            m["work_dir_bound"]["tight_bound_bytes"] = int(TARGETS["work_dir_factor"] * lp *
                                                           m["work_dir_bound"]["parts_in_flight"])
        m["peak_rss_script_bytes"] = {s["step"]: s["peak_rss_bytes"] for s in steps}
        if out_root is not None:
            self.verify(m, snap, out_root)
        if not self.args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
            self.purge_hub(prefix.rstrip("/"))
        return m

    def m_together(self, label: str, *, source: str, destination: str, out_root: str, runs: str, snap: dict,
                   files: int, nbytes: int, endpoint: str, proxy: Proxy, first_file,
                   name: str = "pipeline, stages together", extra_env: dict | None = None) -> dict:
        """The three scripts started at one instant (the README's ``unzipper & zipper & mapper; wait``),
        on one WORK_DIR; wall until the last one exits; each must exit 0."""
        work_dir = os.path.join(runs, "together-work")
        os.makedirs(work_dir)
        prefix = f"{label}/pipeline/"
        env = self.pipeline_env(source=source, destination=destination, prefix=prefix, work_dir=work_dir,
                                endpoint=endpoint, extra=extra_env)
        scripts = dict(SCRIPTS)
        stages = [(st, [sys.executable, os.path.join(REPO, scripts[st])]) for st in TOGETHER_ORDER]
        started_epoch = time.time()   # wall clock on purpose: compared with the hub's LastModified
        r = self.runner.run_together(label, stages, env, proxy=proxy, watch_dir=work_dir, cwd=REPO,
                                     first_file=first_file)
        for st in r["steps"]:
            st["script"] = scripts[st["step"]]
        m = self.method_from_steps(name, "together", r["steps"], files, nbytes)
        m.update({"wall_s": r["wall_s"], "s3": r["s3"], "peak_work_dir_bytes": r["peak_work_dir_bytes"],
                  "first_file_s": r.get("first_file_s"), "first_file_polls": r.get("first_file_polls"),
                  "started_order": list(TOGETHER_ORDER)})
        m["settings"] = {k: env.get(k, PIPELINE_DEFAULTS.get(k)) for k in
                         sorted(set(PIPELINE_DEFAULTS) | set(self.args.env_pairs))}
        m["map"] = self.map_info(prefix)
        m["first_restored_record_s"] = self.first_record_after(prefix + "_restored/", started_epoch)
        m["peak_rss_script_bytes"] = {s["step"]: s["peak_rss_bytes"] for s in r["steps"]}
        self.finish_method(m, files, nbytes)
        self.verify(m, snap, out_root)
        if not self.args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
            self.purge_hub(prefix.rstrip("/"))
        return m

    def first_record_after(self, records_prefix: str, started_epoch: float) -> float | None:
        """Seconds from ``started_epoch`` to the earliest LastModified under ``records_prefix`` on the
        hub (the hub's clock is this machine's; its LastModified may be whole seconds)."""
        try:
            s3 = self.hub.boto3()
            times = [o["LastModified"].timestamp()
                     for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=records_prefix)
                     for o in page.get("Contents", [])]
            return min(times) - started_epoch if times else None
        except Exception as exc:  # informational only
            log(f"   listing {records_prefix}: {exc!r}")
            return None

    def seq_and_together(self, label: str, ms: list, *, source: str, dest_seq: str, dest_tog: str,
                         out_seq: str, out_tog: str, runs: str, snap: dict, files: int, nbytes: int,
                         proxy: Proxy, first_file, extra_env: dict | None = None, suffix: str = "") -> None:
        """The pipeline one stage after another, then the stages together, as the methods allow."""
        if "pipeline" in self.args.methods:
            log(f"   pipeline{suffix}, one stage after another")
            ms.append(self.m_pipeline(label, source=source, destination=dest_seq, out_root=out_seq, runs=runs,
                                      snap=snap, files=files, nbytes=nbytes, endpoint=proxy.url, proxy=proxy,
                                      name="pipeline, one after another", extra_env=extra_env))
        if "together" in self.args.methods:
            log(f"   pipeline{suffix}, stages together")
            ms.append(self.m_together(f"{label}-together", source=source, destination=dest_tog, out_root=out_tog,
                                      runs=runs, snap=snap, files=files, nbytes=nbytes, endpoint=proxy.url,
                                      proxy=proxy, first_file=first_file, extra_env=extra_env,
                                      name="pipeline, stages together"))

    # --- data sets
    def run_set(self, name: str) -> None:
        args = self.args
        root = os.path.join(self.work, "sets", name)
        src = os.path.join(root, "source")
        runs = os.path.join(self.work, "runs", name)
        os.makedirs(runs)
        log(f"== data set {name}: generating SOURCE in {src}")
        info = generate_set(name, src, args)
        log(f"   {info['files']} files, {info['bytes'] / MIB:.1f} MiB, {info['folders']} folders "
            f"({info['top_level_folders']} top level) in {info['generate_s']:.1f}s; hashing SOURCE")
        snap = snapshot(src)
        files, nbytes = info["files"], info["bytes"]
        section = {"title": f"{name}: {files} files, {nbytes / MIB:.1f} MiB, {info['folders']} folders",
                   "set": name, "mode": "local", "data": info, "baseline": "rclone copy via S3",
                   "methods": []}
        self.sections.append(section)
        self.current = name
        for k in range(args.rounds):
            label, rruns = round_of(name, runs, k)
            os.makedirs(rruns, exist_ok=True)
            if args.rounds > 1:
                log(f"   round {k + 1} of {args.rounds}")
            self.local_round(name, label, rruns, section["methods"], src=src, snap=snap, files=files, nbytes=nbytes)
        collapse_rounds(section)
        self.ratios(section)
        if name in args.mode_sets and args.remotes:
            self.run_remotes(name, root, runs, snap, files, nbytes, info)
        if name in args.mode_sets and args.delay_ms > 0:
            self.run_delay(name, src, runs, snap, files, nbytes, info)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(runs, ignore_errors=True)

    def local_round(self, name: str, label: str, runs: str, ms: list, *, src: str, snap: dict, files: int,
                    nbytes: int) -> None:
        """One round of the methods on a local set (``label`` and ``runs`` are this round's)."""
        methods, args = self.args.methods, self.args
        if "cp" in methods:
            log("   cp -a")
            ms.append(self.m_cp(label, src, runs, snap, files, nbytes))
        if "rclone" in methods:
            log("   rclone copy via S3")
            ms.append(self.m_rclone_s3(label, src, runs, snap, files, nbytes, proxy=self.proxy,
                                       name="rclone copy via S3", hub_path=f"{label}/rclone-copy"))
            if args.proxy_overhead:
                log("   rclone copy via S3, no proxy (info)")
                ms.append(self.m_rclone_s3(label, src, runs, snap, files, nbytes, proxy=None,
                                           name="rclone copy via S3, no proxy (info)",
                                           hub_path=f"{label}/rclone-copy-noproxy"))
        if "archive" in methods:
            log("   rclone archive create/extract")
            ms.append(self.m_archive(label, src, runs, snap, files, nbytes))
        dst, dst_tog = os.path.join(runs, "pipeline-dest"), os.path.join(runs, "together-dest")
        self.seq_and_together(label, ms, source=src, dest_seq=dst, dest_tog=dst_tog, out_seq=dst, out_tog=dst_tog,
                              runs=runs, snap=snap, files=files, nbytes=nbytes, proxy=self.proxy,
                              first_file=first_local_file(dst_tog, snap))

    def run_remotes(self, name: str, set_root: str, runs: str, snap: dict, files: int, nbytes: int,
                    info: dict) -> None:
        log(f"== {name}, remotes mode: SOURCE and DESTINATION each on its own rclone serve s3")
        rruns = os.path.join(runs, "remotes")
        dst_data = os.path.join(rruns, "dst-data")
        src_srv = S3Server(f"{name}-source", set_root, self.rclone, self.log_dir)          # bucket "source"
        buckets = [[f"{b}{round_of('', '', k)[0]}" for b in ("direct", "pipeline", "together")]
                   for k in range(self.args.rounds)]
        dst_srv = S3Server(f"{name}-dest", dst_data, self.rclone, self.log_dir,
                           buckets=tuple(b for bs in buckets for b in bs))
        section = {"title": f"{name}, remotes mode: SOURCE and DESTINATION as rclone S3 remotes",
                   "set": name, "mode": "remotes", "data": info, "baseline": "rclone copy direct",
                   "methods": []}
        self.sections.append(section)
        self.current = f"{name}, remotes"
        try:
            remotes = {**src_srv.rclone_env("srcs3"), **dst_srv.rclone_env("dsts3")}
            env = self.base_env()
            env.update(remotes)
            for k, (direct, seq, tog) in enumerate(buckets):
                label, kruns = round_of(f"{name}-remotes", rruns, k)
                log("   rclone copy SOURCE -> DESTINATION direct")
                step = self.runner.run(f"{label}-direct", [self.rclone, "copy", "srcs3:source", f"dsts3:{direct}",
                                                           "--transfers", str(self.args.transfers)], env)
                step["step"] = "SOURCE -> DESTINATION"
                m = self.method_from_steps("rclone copy direct", "rclone-copy", [step], files, nbytes)
                self.verify(m, snap, os.path.join(dst_data, direct))
                section["methods"].append(m)
                self.seq_and_together(label, section["methods"], source="srcs3:source",
                                      dest_seq=f"dsts3:{seq}", dest_tog=f"dsts3:{tog}",
                                      out_seq=os.path.join(dst_data, seq), out_tog=os.path.join(dst_data, tog),
                                      runs=kruns, snap=snap, files=files, nbytes=nbytes, proxy=self.proxy,
                                      first_file=first_remote_file(dst_srv, tog, snap), extra_env=remotes,
                                      suffix=" with remotes")
            collapse_rounds(section)
        finally:
            src_srv.stop()
            dst_srv.stop()
        self.ratios(section)

    def run_delay(self, name: str, src: str, runs: str, snap: dict, files: int, nbytes: int, info: dict) -> None:
        ms_ = self.args.delay_ms
        log(f"== {name}, delay mode: {ms_:g} ms added to every S3 request")
        druns = os.path.join(runs, "delay")
        os.makedirs(druns)
        proxy = Proxy(f"delay{ms_:g}ms", self.hub.url, self.log_dir, delay_ms=ms_,
                      request_log=self.args.request_log)
        section = {"title": f"{name}, delay mode: {ms_:g} ms added to every S3 request",
                   "set": name, "mode": "delay", "delay_ms": ms_, "data": info,
                   "baseline": "rclone copy via S3 (delayed)", "methods": []}
        self.sections.append(section)
        self.current = f"{name}, {ms_:g} ms delay"
        try:
            for k in range(self.args.rounds):
                label, kruns = round_of(f"{name}-delay", druns, k)
                log("   rclone copy via S3 (delayed)")
                section["methods"].append(self.m_rclone_s3(label, src, kruns, snap, files, nbytes, proxy=proxy,
                                                           name="rclone copy via S3 (delayed)",
                                                           hub_path=f"{label}/rclone-copy"))
                dst, dst_tog = os.path.join(kruns, "pipeline-dest"), os.path.join(kruns, "together-dest")
                self.seq_and_together(label, section["methods"], source=src, dest_seq=dst,
                                      dest_tog=dst_tog, out_seq=dst, out_tog=dst_tog, runs=kruns, snap=snap,
                                      files=files, nbytes=nbytes, proxy=proxy,
                                      first_file=first_local_file(dst_tog, snap), suffix=" (delayed)")
            collapse_rounds(section)
        finally:
            proxy.stop()
        self.ratios(section)

    def run_mapper_million(self) -> None:
        n = self.args.mapper_files
        root = os.path.join(self.work, "million")
        src = os.path.join(root, "source")
        os.makedirs(src)
        log(f"== mapper on {n} empty files: generating SOURCE in {src}")
        info = gen_empty_files(src, n)
        log(f"   {info['files']} empty files in {info['leaf_folders']} folders "
            f"({info['top_level_folders']} top level) in {info['generate_s']:.1f}s")
        runs = os.path.join(root, "runs")
        os.makedirs(runs)
        m = self.m_pipeline("million", source=src, destination=os.path.join(runs, "unused-dest"), out_root=None,
                            runs=runs, snap={}, files=info["files"], nbytes=0, endpoint=self.proxy.url,
                            proxy=self.proxy, name="mapper alone", stages=SCRIPTS[:1])
        m.pop("work_dir_bound", None)
        mapped = (m.get("map") or {}).get("totals", {}) or {}
        m["mapped_files"] = mapped.get("files")
        m["check"] = "ok" if mapped.get("files") == info["files"] else \
            f"index says {mapped.get('files')} files, SOURCE has {info['files']}"
        if m["status"] != "ok" or m["check"] != "ok":
            self.failures.append(f"mapper on {n} empty files: {m['status']}, {m['check']}")
        log(f"   mapper: {m['wall_s']:.1f}s, peak RSS {m['peak_rss_bytes'] / MIB:.0f} MiB, "
            f"rclone {m['peak_children_rss_bytes'] / MIB:.0f} MiB, {m['check']}")
        self.extra["mapper_million"] = {"data": info, "result": m}
        if not self.args.keep:
            shutil.rmtree(root, ignore_errors=True)

    # --- results
    @staticmethod
    def ratios(section: dict) -> None:
        base = next((m for m in section["methods"] if m["method"] == section["baseline"]
                     and m.get("status") == "ok"), None)
        for m in section["methods"]:
            if base and m.get("wall_s") and m.get("status") == "ok":
                m["ratio_to_baseline"] = m["wall_s"] / base["wall_s"]

    def targets(self) -> list[dict]:
        out: list[dict] = []

        def add(name: str, measured, target, unit: str = "", note: str = "", aim=None) -> None:
            row = {"target": name, "measured": measured, "limit": target, "aim": aim, "unit": unit, "note": note,
                   "result": verdict(measured, target, unit, none="reported" if measured is not None else "n/a")}
            if aim is not None:
                row["aim_result"] = verdict(measured, aim, unit)
            out.append(row)

        for sec in self.sections:
            seq = next((m for m in sec["methods"] if m.get("kind") == "pipeline"), None)
            tog = next((m for m in sec["methods"] if m.get("kind") == "together"), None)
            head = tog if ok(tog) else seq if ok(seq) else None
            ratio = head.get("ratio_to_baseline") if head else None
            name, kind = sec["set"], ("stages together" if head is tog else "one stage after another")
            beside = together_note(seq, tog)
            if sec["mode"] == "local":
                limits = {"small": ("small files, local ends", TARGETS["small_ratio"], None),
                          "large": ("big files through parts", TARGETS["large_ratio"], TARGETS["large_ratio_aim"])}
                title, lim, aim = limits.get(name, (f"{name}, local ends (no target)", None, None))
                add(f"{title}: pipeline ({kind}) / rclone copy via S3", ratio, lim, "x", beside, aim)
            elif sec["mode"] == "remotes":
                add(f"{name}, SOURCE and DESTINATION remotes: pipeline ({kind}) / rclone copy direct", ratio,
                    TARGETS["remotes_ratio"], "x", beside, TARGETS["remotes_ratio_aim"])
            elif sec["mode"] == "delay":
                lim = TARGETS["delay_10ms_ratio"] if sec["delay_ms"] == 10 else TARGETS["delay_ratio"]
                add(f"{name}, {sec['delay_ms']:g} ms per request: pipeline ({kind}) / rclone copy via S3", ratio,
                    lim, "x", beside + ("" if sec["delay_ms"] == 10 else "; issue 19's 0.25 x is for 10 ms"))
            if ok(tog):
                add(f"{sec['title'].split(':')[0]}: first file at DESTINATION (stages together)",
                    tog.get("first_file_s"), None, "s", first_file_note(tog))
            self.request_targets(sec, head, seq, tog, add)
            if sec["mode"] == "local" and seq is not None:
                self.local_targets(sec, seq, add)
        mm = self.extra.get("mapper_million")
        if mm:
            r = mm["result"]
            add(f"mapper on {mm['data']['files']:,} empty files: peak RSS (MiB)",
                r["peak_rss_bytes"] / MIB if r["status"] == "ok" else None, TARGETS["mapper_million_rss_mib"], "MiB",
                f"took {r['wall_s']:.1f}s; rclone lsjson peaked at {r['peak_children_rss_bytes'] / MIB:.0f} MiB")
        checked = [(sec["title"].split(":")[0], m["method"], summary) for sec in self.sections
                   for m in sec["methods"] if "tree_check" in m
                   for summary in m.get("rounds_tree", [m["tree_check"]["summary"]])]
        bad = [f"{method} ({title}): {summary}" for title, method, summary in checked if summary != "ok"]
        if checked:
            out.append({"target": "every output tree equals SOURCE (paths, sizes, SHA-256, mtime within 1 s)",
                        "measured": f"{len(checked) - len(bad)}/{len(checked)} trees ok", "limit": "all",
                        "aim": None, "unit": "", "result": "met" if not bad else "missed", "note": "; ".join(bad)})
        return out

    @staticmethod
    def request_targets(sec: dict, head: dict | None, seq: dict | None, tog: dict | None, add) -> None:
        """S3 requests per part (issue 19: about 25 or fewer, small files) and per 1,000 small files (issue 6)."""
        label = sec["title"].split(":")[0]
        per_part = {id(m): requests_per_part(m) for m in (seq, tog) if ok(m)}
        if head is not None:
            kind = "stages together" if head is tog else "one stage after another"
            other = seq if head is tog else None
            note = (f"{head['s3']['total']} requests (all three stages, through the counting proxy) / "
                    f"{head['map'].get('parts')} parts in the map" if head.get("s3") and head.get("map") else "")
            if other is not None and per_part.get(id(other)) is not None:
                note += f"; one after another: {per_part[id(other)]:.1f} per part"
            mode = logged_mode(head)
            note += (f"; the zipper logged mode: {mode}" if mode else "")
            if mode and "claim" not in mode:
                note += " (the hub ignores conditional writes: no claims; bench/workers.py --hub moto has them)"
            add(f"{label}: S3 requests per part ({kind})", per_part.get(id(head)),
                TARGETS["requests_per_part"] if sec["set"] == "small" and sec["mode"] != "remotes" else None, "",
                note)
        if sec["set"] == "small" and sec["mode"] == "local" and ok(seq):
            add("small: S3 requests per 1,000 files (pipeline one after another, all stages)",
                seq.get("requests_per_1000_files"), TARGETS["requests_per_1000_small"])

    def local_targets(self, sec: dict, p: dict, add) -> None:
        """WORK_DIR and RSS (issue 6) of the pipeline run one stage after another."""
        good = p.get("status") == "ok"
        b = p["work_dir_bound"]
        note = (f"1.1 x min(part {b['part_size_bytes'] / MIB:.0f} MiB, set {b['set_bytes'] / MIB:.0f} MiB)"
                f" x {b['parts_in_flight']} in flight")
        if "tight_bound_bytes" in b:
            note += (f"; largest planned part {b['largest_planned_part_bytes'] / MIB:.1f} MiB "
                     f"-> 1.1 x part x workers = {b['tight_bound_bytes'] / MIB:.0f} MiB")
        if not good:
            note += (f"; the pipeline failed: {p.get('peak_work_dir_bytes', 0) / MIB:.0f} MiB "
                     "seen before it stopped")
        add(f"{sec['set']}: peak bytes under WORK_DIR, one stage after another (MiB)",
            p.get("peak_work_dir_bytes", 0) / MIB if good else None, b["bound_bytes"] / MIB, "MiB", note)
        for s in p["steps"]:
            add(f"{sec['set']}: peak RSS of {s['script']} (MiB)", s["peak_rss_bytes"] / MIB,
                TARGETS["script_rss_mib"], "MiB",
                f"its rclone children peaked at {s['peak_children_rss_bytes'] / MIB:.0f} MiB (summed)"
                + ("" if s["rc"] == 0 else f"; the script exited {s['rc']}"))


def round_of(label: str, runs: str, k: int) -> tuple[str, str]:
    """Round ``k``'s label and folder: the first round keeps the plain ones."""
    if k == 0:
        return label, runs
    return f"{label}-r{k + 1}", os.path.join(runs, f"round{k + 1}")


def collapse_rounds(section: dict) -> None:
    """One row per method after ``--rounds``: the round of median wall time (the lower middle one for an
    even count), or the first failed round, with every round's wall time beside it."""
    by_name: dict[str, list[dict]] = {}
    for m in section["methods"]:
        by_name.setdefault(m["method"], []).append(m)
    rows = []
    for ms in by_name.values():
        if len(ms) == 1:
            rows.append(ms[0])
            continue
        failed = [m for m in ms if m.get("status") != "ok"]
        rep = dict(failed[0] if failed else sorted(ms, key=lambda m: m["wall_s"])[(len(ms) - 1) // 2])
        rep["rounds_wall_s"] = [m.get("wall_s") for m in ms]
        rep["rounds_tree"] = [m.get("tree_check", {}).get("summary", "not checked") for m in ms]
        if rep.get("kind") == "together":
            rep["rounds_first_file_s"] = [m.get("first_file_s") for m in ms]
        rows.append(rep)
    section["methods"] = rows


def ok(m: dict | None) -> bool:
    return m is not None and m.get("status") == "ok"


def verdict(measured, limit, unit: str, none: str = "n/a") -> str:
    """'met', or 'missed by <how much>' (absolute, and relative to the limit)."""
    if limit is None or measured is None:
        return none
    if measured <= limit:
        return "met"
    over = measured - limit
    return f"missed by {over:.2f}{(' ' + unit) if unit else ''} ({100 * over / limit:.0f}%)"


def logged_mode(m: dict) -> str:
    """The worker mode the zipper logged at start ('one worker', claims, shards)."""
    for st in m.get("steps", []):
        if st.get("step") == "zipper":
            try:
                with open(st["log"], encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        if "mode: " in line:
                            return line.rsplit("mode: ", 1)[1].strip()
            except OSError:
                return ""
    return ""


def requests_per_part(m: dict) -> float | None:
    parts = (m.get("map") or {}).get("parts")
    return m["s3"]["total"] / parts if parts and m.get("s3") else None


def together_note(seq: dict | None, tog: dict | None) -> str:
    """The one-after-another figure beside the together one."""
    bits = []
    if ok(tog) and ok(seq):
        bits.append(f"one stage after another: {fmt(seq.get('ratio_to_baseline'), '.2f')} x ({seq['wall_s']:.1f} s); "
                    f"together {tog['wall_s']:.1f} s = {tog['wall_s'] / seq['wall_s']:.2f} of it")
    elif ok(seq) and tog is not None:
        bits.append(f"stages together failed (exit {tog.get('rc')}); figure of the stages one after another")
    elif ok(tog) and seq is None:
        bits.append("one stage after another not run")
    return "; ".join(bits)


def first_file_note(tog: dict) -> str:
    rec = tog.get("first_restored_record_s")
    note = f"polling DESTINATION every {FIRST_FILE_POLL_S:g} s ({tog.get('first_file_polls')} polls)"
    if tog.get("first_file_s") is None:
        note += ", never seen"
    if rec is not None:
        note += f"; first P_restored/ record's LastModified {rec:.1f} s after the start"
    return note


# ---------------------------------------------------------------------------------------------
# Text output

def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec)


def mib(v) -> str:
    return "-" if not v else f"{v / MIB:.0f}"


def render(bench: Bench, meta: dict, targets: list[dict]) -> str:
    lines = []
    lines.append(f"migration benchmark  {meta['started_at']}  host {meta['host']['cpus']} CPUs, "
                 f"rclone {meta['rclone_version']}, Python {meta['python']}")
    la0, la1 = meta["load_average_start"], meta.get("load_average_end", (0, 0, 0))
    lines.append(f"load average (1/5/15 min) at start {la0[0]:.1f}/{la0[1]:.1f}/{la0[2]:.1f}, "
                 f"at end {la1[0]:.1f}/{la1[1]:.1f}/{la1[2]:.1f}"
                 + ("  -- the machine was busy: compare only figures of this run, and expect noise"
                    if max(la0[0], la1[1]) > 0.75 * (meta['host']['cpus'] or 1) else ""))
    if meta.get("interrupted"):
        lines.append("INTERRUPTED: partial results")
    s = meta["pipeline_settings"]
    lines.append("pipeline settings: " + ", ".join(f"{k}={v}" for k, v in s.items())
                 + f"; rclone copy --transfers {meta['transfers']}")
    head = (f"{'method':<34} {'wall s':>8} {'files/s':>8} {'MiB/s':>7} {'x base':>7} {'RSS MiB':>8} "
            f"{'+child':>7} {'WORK_DIR':>9} {'S3 req':>7} {'req/1k':>7}  tree")
    for sec in bench.sections:
        lines.append("")
        lines.append(f"== {sec['title']}  (x base = wall / {sec['baseline']})")
        lines.append(head)
        lines.append("-" * len(head))
        for m in sec["methods"]:
            if m.get("status") == "n/a":
                lines.append(f"{m['method']:<34} n/a: {m['reason']}")
                continue
            s3 = m.get("s3")
            tc = m.get("tree_check", {})
            row = (f"{m['method'][:34]:<34} {fmt(m.get('wall_s')):>8} {fmt(m.get('files_per_s'), '.0f'):>8} "
                   f"{fmt(m.get('mib_per_s')):>7} {fmt(m.get('ratio_to_baseline'), '.2f'):>7} "
                   f"{mib(m.get('peak_rss_bytes')):>8} {mib(m.get('peak_children_rss_bytes')):>7} "
                   f"{mib(m.get('peak_work_dir_bytes')) if 'peak_work_dir_bytes' in m else '-':>9} "
                   f"{s3['total'] if s3 else '-':>7} {fmt(m.get('requests_per_1000_files'), '.1f'):>7}  "
                   f"{tc.get('summary', '-') if m.get('status') == 'ok' else 'FAILED (exit ' + str(m.get('rc')) + '), ' + tc.get('summary', '-')}")
            lines.append(row)
            if len(m.get("steps", [])) > 1 or m.get("kind") == "pipeline":
                for st in m["steps"]:
                    s3s = st.get("s3")
                    lines.append(f"{'  ' + st.get('step', st['label']):<34} {fmt(st['wall_s']):>8} "
                                 f"{fmt(st.get('files_per_s'), '.0f'):>8} {fmt(st.get('mib_per_s')):>7} "
                                 f"{'':>7} {mib(st['peak_rss_bytes']):>8} {mib(st['peak_children_rss_bytes']):>7} "
                                 f"{mib(st.get('peak_work_dir_bytes')) if 'peak_work_dir_bytes' in st else '-':>9} "
                                 f"{s3s['total'] if s3s else '-':>7} {fmt(st.get('requests_per_1000_files'), '.1f'):>7}"
                                 + ("" if st["rc"] == 0 else f"  exit {st['rc']}"))
            if m.get("kind") in ("pipeline", "together") and m.get("map"):
                mp = m["map"]
                if "parts" in mp:
                    lines.append(f"{'  (map: ' + str(mp['parts']) + ' parts, largest ' + fmt(mp['largest_part_bytes'] / MIB) + ' MiB)':<34}")
            if m.get("rounds_wall_s"):
                lines.append(f"{'':<34} median of {len(m['rounds_wall_s'])} rounds, in run order: "
                             + ", ".join(fmt(w) for w in m["rounds_wall_s"]) + " s"
                             + ("; first file at DESTINATION " + ", ".join(fmt(w) for w in m["rounds_first_file_s"])
                                + " s" if m.get("rounds_first_file_s") else ""))
            if m.get("kind") == "together":
                lines.append(f"{'':<34} started at one instant in the order {', '.join(m['started_order'])}; "
                             "each stage's wall is from that instant to its exit; first file at DESTINATION "
                             f"after {fmt(m.get('first_file_s'), '.1f', 'never')} s"
                             + (f" (first P_restored/ record {m['first_restored_record_s']:.1f} s)"
                                if m.get("first_restored_record_s") is not None else ""))
            if s3 and s3.get("by_method"):
                lines.append(f"{'':<34} S3 by method: " + ", ".join(f"{k} {v}" for k, v in s3["by_method"].items())
                             + (f"; proxy 502s {s3['errors']}" if s3.get("errors") else "")
                             + (f"; answers cut short {s3['aborted']}" if s3.get("aborted") else "")
                             + ("; statuses " + ", ".join(f"{k}: {v}" for k, v in s3["by_status"].items()
                                                          if not k.startswith("2")) if any(
                                 not k.startswith("2") for k in s3["by_status"]) else ""))
    mm = bench.extra.get("mapper_million")
    if mm:
        r = mm["result"]
        lines.append("")
        lines.append(f"== mapper alone on {mm['data']['files']:,} empty files ({mm['data']['leaf_folders']} folders, "
                     f"{mm['data']['top_level_folders']} top level; generated in {mm['data']['generate_s']:.1f}s)")
        s3 = r.get("s3") or {}
        lines.append(f"   wall {r['wall_s']:.1f}s ({fmt(r.get('files_per_s'), '.0f')} files/s), exit {r['rc']}, "
                     f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB, rclone children {r['peak_children_rss_bytes'] / MIB:.0f} MiB, "
                     f"peak WORK_DIR {r.get('peak_work_dir_bytes', 0) / MIB:.0f} MiB, S3 requests {s3.get('total', '-')}, "
                     f"map check: {r['check']}")
    lines.append("")
    lines.append("== targets (reported, not asserted)")
    for t in targets:
        meas = t["measured"]
        if isinstance(meas, float):
            meas = f"{meas:.2f}"
        lim = t["limit"]
        lim = "-" if lim is None else (f"<= {lim:.4g}" if isinstance(lim, (int, float)) else lim)
        unit = (" " + t["unit"]) if t["unit"] else ""
        aim = (f", aim <= {t['aim']:.4g}{unit}: {t['aim_result']}" if t.get("aim") is not None else "")
        lines.append(f"{t['result']:<22} {t['target']}: "
                     f"{(str(meas) + unit) if meas is not None else 'not measured'} "
                     f"(target {lim}{unit if lim != '-' else ''}{aim})"
                     + (f"  [{t['note']}]" if t["note"] else ""))
    if bench.failures:
        lines.append("")
        lines.append("== failures")
        lines.extend(f"   {f}" for f in bench.failures)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bash bench/run.sh",
        description="Benchmark of the migration pipeline against cp -a, rclone copy through S3 and "
                    "rclone archive, on generated data, with a local rclone serve s3 hub.")
    ap.add_argument("--small", type=int, default=None, help="small files (1-64 KiB) [20000; --quick 1000]")
    ap.add_argument("--folders", type=int, default=None, help="folders of the small tree [300; --quick 20]")
    ap.add_argument("--large", type=int, default=None, help="large files [40; --quick 4]")
    ap.add_argument("--large-mib", type=float, default=None, help="size of each large file, MiB [25; --quick 5]")
    ap.add_argument("--sets", default="small,large,mixed", help="data sets to run [small,large,mixed]")
    ap.add_argument("--methods", default="cp,rclone,archive,pipeline,together",
                    help="methods to time [cp,rclone,archive,pipeline,together]; pipeline runs the three "
                         "scripts one after another, together starts them at one instant")
    ap.add_argument("--remotes", action="store_true",
                    help="also run the mode with SOURCE and DESTINATION as rclone S3 remotes")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="also run the mode with this many ms added to every S3 request [0 = skip]")
    ap.add_argument("--mode-sets", default="small", help="data sets the remotes and delay modes run on [small]")
    ap.add_argument("--mapper-million", action="store_true",
                    help="also run the mapper alone on a SOURCE of --mapper-files empty files")
    ap.add_argument("--mapper-files", type=int, default=1_000_000, help="files for --mapper-million [1000000]")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-test preset (about a minute): 1000 small files in 20 folders, 4 large files of 5 MiB")
    ap.add_argument("--proxy-overhead", action="store_true",
                    help="also time rclone copy via S3 straight to the server (no proxy), for information")
    ap.add_argument("--request-log", action="store_true",
                    help="the proxies also log every S3 request (time, method, status, bytes, path) "
                         "to requests-<proxy>.log in the log folder")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each mode's methods this many times, in turn (baseline, pipeline one after another, "
                         "stages together, baseline, ...); the table shows the median round of each [1]")
    ap.add_argument("--transfers", type=int, default=8, help="rclone copy --transfers [8]")
    ap.add_argument("--archive-format", default="zip", choices=("zip", "tar"), help="rclone archive format [zip]")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="pipeline variable for every pipeline run, e.g. --env MAX_PARALLEL_WORKERS=4 (repeatable)")
    ap.add_argument("--seed", type=int, default=1, help="data generator seed [1]")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "results.json"),
                    help="JSON results file [bench_out/results.json]; the table goes beside it (.txt), "
                         "command logs into <name>-logs/")
    ap.add_argument("--workdir", default=None, help="empty or new folder for data and runs [a new temporary folder]")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (data, outputs, hub objects)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds any one timed command may take [7200]")
    ap.add_argument("--rss-interval", type=float, default=0.05, help="seconds between RSS samples [0.05]")
    ap.add_argument("--walk-interval", type=float, default=0.15, help="seconds between walks of WORK_DIR [0.15]")
    args = ap.parse_args(argv)
    defaults = {"small": (20000, 1000), "folders": (300, 20), "large": (40, 4), "large_mib": (25.0, 5.0)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    args.methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    args.mode_sets = [s.strip() for s in args.mode_sets.split(",") if s.strip()]
    for s in args.sets + args.mode_sets:
        if s not in ("small", "large", "mixed"):
            ap.error(f"unknown data set {s!r} (small, large, mixed)")
    for s in args.methods:
        if s not in ("cp", "rclone", "archive", "pipeline", "together"):
            ap.error(f"unknown method {s!r} (cp, rclone, archive, pipeline, together)")
    args.env_pairs = {}
    for pair in args.env:
        if "=" not in pair:
            ap.error(f"--env wants KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        args.env_pairs[k] = v
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.small < 0 or args.large < 0 or args.folders < 1:
        ap.error("--small and --large must be >= 0, --folders >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = tempfile.mkdtemp(prefix="migration-bench-")
    else:
        args.workdir = os.path.abspath(args.workdir)
        if os.path.exists(args.workdir) and os.listdir(args.workdir):
            print(f"bench: --workdir {args.workdir} is not empty; give a new or empty folder", file=sys.stderr)
            return 2
        os.makedirs(args.workdir, exist_ok=True)
    bench = Bench(args)
    os.makedirs(os.path.dirname(bench.out_path), exist_ok=True)
    if os.path.isdir(bench.log_dir):
        shutil.rmtree(bench.log_dir)
    os.makedirs(bench.log_dir)

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # also when started with SIGINT ignored
        signal.signal(sig, on_term)

    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rclone_version = subprocess.run([bench.rclone, "version"], capture_output=True, text=True).stdout.split("\n")[0]
    meta = {"started_at": started, "args": {k: v for k, v in vars(args).items()},
            "rclone": bench.rclone, "rclone_version": rclone_version.replace("rclone ", ""),
            "python": platform.python_version(), "repo": REPO, "workdir": args.workdir,
            "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "pipeline_settings": bench.pipeline_settings(), "transfers": args.transfers,
            "targets": TARGETS, "load_average_start": os.getloadavg()}
    code = 0
    log(f"work folder {args.workdir}; logs in {bench.log_dir}")
    free = shutil.disk_usage(args.workdir).free
    need = 0
    for s in args.sets:
        b = (args.small * 32.5 * KIB if s != "large" else 0) + (args.large * args.large_mib * MIB if s != "small" else 0)
        need = max(need, b * (4 if not args.keep else 9))
    if need > free * 0.9:
        log(f"warning: the largest set may need about {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free")
    try:
        hub_data = os.path.join(args.workdir, "hub-data")
        bench.hub = S3Server("hub", hub_data, bench.rclone, bench.log_dir, buckets=(BUCKET,))
        bench.proxy = Proxy("count", bench.hub.url, bench.log_dir, request_log=args.request_log)
        log(f"hub: rclone serve s3 at {bench.hub.url}, counting proxy at {bench.proxy.url}")
        for s in args.sets:
            bench.run_set(s)
        if args.mapper_million:
            bench.run_mapper_million()
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'Ctrl-C'}); stopping servers and proxies")
        code = 130
    except Exception as exc:
        import traceback
        traceback.print_exc()
        log(f"benchmark failed: {exc!r}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        REG.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep:
            log(f"kept the work folder {args.workdir}")
        else:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if bench.sections or bench.extra:
        for sec in bench.sections:          # also for a section an interruption cut short
            bench.ratios(sec)
        meta["load_average_end"] = os.getloadavg()
        targets = bench.targets()
        meta["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        meta["interrupted"] = code == 130
        text = render(bench, meta, targets)
        print(text)
        result = {"meta": meta, "sections": bench.sections, "targets": targets, "failures": bench.failures,
                  **bench.extra}
        with open(bench.out_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
            fh.write("\n")
        with open(os.path.splitext(bench.out_path)[0] + ".txt", "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        log(f"wrote {bench.out_path} (and .txt)")
    if code == 0 and bench.failures:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
