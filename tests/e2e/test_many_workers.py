"""Many workers on one migration (issue 9), end to end: the real scripts as subprocesses, real
rclone, moto's server (which enforces conditional writes) with a lease of a few seconds, and
``rclone serve s3`` (which ignores them) for static shards.

What is counted: every "part uploaded" and "part restored" event in the workers' JSON logs,
per part; a part published twice would show twice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from e2ekit import ROOT, Env, base_env
from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e

LEASE = "3"
SCRIPTS = ("master_mapper.py", "python_zipper.py", "python_unzipper.py")


def bulk_tree(root: str, folders: int = 4, files: int = 80, seed: int = 3) -> None:
    """The sample tree (odd names, root files, empty dirs, large files) and ``folders`` folders
    of ``files`` small files each: with SPLIT_THRESHOLD=10, 8 parts per folder."""
    make_tree(root, small_files=12)
    rng = random.Random(seed)
    for f in range(folders):
        for i in range(files):
            path = os.path.join(root, f"bulk {f}", f"sub{i % 3}", f"file {i:03d}.bin")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(rng.randbytes(rng.randrange(500, 4000)))
            os.utime(path, (1_100_000_000 + i, 1_100_000_000 + i))


def worker_env(env, n: int, **extra: str) -> dict:
    return {**env.vars, "WORK_DIR": os.path.join(env.tmp, f"work-{n}"), "WORKER_ID": f"w{n}",
            "WORKER_COUNT": "3", "WORKER_INDEX": str(n), "LEASE_SECONDS": LEASE, "LOG_FORMAT": "json",
            "MAX_PARALLEL_WORKERS": "2", **extra}


def start(env, script: str, n: int, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script)], env=worker_env(env, n, **extra),
                            cwd=env.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(procs: dict[int, subprocess.Popen], timeout: float = 240) -> dict[int, tuple[int, list[dict]]]:
    """Wait for every worker; (exit code, JSON log events) per worker."""
    done = {}
    for n, proc in procs.items():
        _out, err = proc.communicate(timeout=timeout)
        events = []
        for line in err.splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"message": line})
        done[n] = (proc.returncode, events)
    return done


def events_per_part(results: dict, message: str) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for _code, events in results.values():
        for e in events:
            if e.get("message", "").startswith(message):
                key = (e.get("folder"), e.get("part"))
                counts[key] = counts.get(key, 0) + 1
    return counts


def assert_all_exit_0(results: dict, what: str) -> None:
    for n, (code, events) in results.items():
        tail = "\n".join(e.get("message", "") for e in events[-30:])
        assert code == 0, f"{what} worker {n} exited {code}:\n{tail}"


def signal_worker(env, proc: subprocess.Popen, n: int, script: str, sig: int) -> None:
    """Signal a worker and its rclone children, as when its machine dies (SIGKILL) or is
    paused (SIGSTOP, SIGCONT); the children run in sessions of their own, so killing the
    Python process alone would leave them running, which no dead machine does."""
    children = os.path.join(env.tmp, f"work-{n}", f".{script}.children")
    deadline = time.monotonic() + 10  # a victim mid-part has its rclone running: wait for it
    while time.monotonic() < deadline and sig != signal.SIGCONT and not (
            os.path.exists(children) and open(children).read().strip()):
        time.sleep(0.02)
    pids = [proc.pid]
    if os.path.exists(children):
        pids += [int(line.split()[0]) for line in open(children) if line.strip()]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def claims_of(env, stage: str) -> dict[str, dict]:
    prefix = f"{env.prefix}_claims/{stage}/"
    return {k: json.loads(env.get(k)) for k in env.objects() if k.startswith(prefix)}


def wait_for_claim(env, stage: str, worker: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key, body in claims_of(env, stage).items():
            if body.get("worker") == worker:
                return key
        time.sleep(0.05)
    raise AssertionError(f"worker {worker} never claimed a {stage} unit")


def part_count(env) -> int:
    index_key = max(k for k in env.objects() if k.endswith("/index.json") and "/_map/" in k)
    index = json.loads(env.get(index_key))
    return sum(len(f.get("part_table") or []) for f in index["folders"])


def test_three_workers_per_stage_finish_with_no_part_done_twice(env):
    bulk_tree(env.source)
    for script, counted in zip(SCRIPTS, (None, "part uploaded", "part restored")):
        results = finish({n: start(env, script, n) for n in range(3)})
        assert_all_exit_0(results, script)
        if script == "master_mapper.py":
            parts = part_count(env)
            assert parts >= 30
            mapped = [e for _c, ev in results.values() for e in ev if e.get("message", "").startswith("mapped ")]
            assert len(mapped) == len({e["folder"] for e in mapped}), "a folder was mapped twice"
            continue
        counts = events_per_part(results, counted)
        twice = {k: v for k, v in counts.items() if v > 1}
        assert not twice, f"{script}: parts done more than once: {twice}"
        assert len(counts) == parts, f"{script}: {len(counts)} parts done, {parts} in the map"
        busy = [n for n, (_c, ev) in results.items() if any(e.get("message", "").startswith(counted) for e in ev)]
        assert len(busy) >= 2, f"{script}: the work was not shared ({busy})"
    assert_same_tree(env.source, env.destination)
    assert not claims_of(env, "zipper") and not claims_of(env, "unzipper"), "claims left behind"
    status = env.run("python_unzipper.py", "--status")
    assert status.returncode == 0 and "claims" in status.stdout


def test_a_killed_and_a_frozen_worker_are_taken_over(env):
    """Three zipper workers: w0 is killed with kill -9 while it holds a part, w1 is frozen with
    SIGSTOP while it holds one; w2 takes both over after the lease and finishes, exit 0. w1,
    resumed after that, finds its claim gone, drops its part and cannot touch w2's result.
    Then three unzipper workers, one killed mid-part, and DESTINATION equals SOURCE."""
    bulk_tree(env.source)
    env.via_rclone()  # rclone downloads every file, and RCLONE_BWLIMIT keeps the victims mid-part
    results = finish({n: start(env, "master_mapper.py", n) for n in range(3)})
    assert_all_exit_0(results, "mapper")
    parts = part_count(env)

    slow = {"RCLONE_BWLIMIT": "8k", "MAX_PARALLEL_WORKERS": "1"}
    killed = start(env, "python_zipper.py", 0, **slow)
    killed_key = wait_for_claim(env, "zipper", "w0")
    signal_worker(env, killed, 0, "zipper", signal.SIGKILL)
    killed_at = time.monotonic()
    killed.communicate()
    frozen = start(env, "python_zipper.py", 1, **slow)
    frozen_key = wait_for_claim(env, "zipper", "w1")
    signal_worker(env, frozen, 1, "zipper", signal.SIGSTOP)
    frozen_at = time.monotonic()
    time.sleep(float(LEASE) + 1)
    status = env.run("python_zipper.py", "--status")
    rows = [line.split() for line in status.stdout.splitlines() if line.startswith("  zipper ")]
    assert {r[3] for r in rows} == {"w0", "w1"} and all(r[-1] == "yes" for r in rows), status.stdout
    survivor = finish({2: start(env, "python_zipper.py", 2)})
    assert_all_exit_0(survivor, "zipper")
    took = [e for e in survivor[2][1] if e.get("message", "").startswith("took over zipper unit")]
    assert {m["message"].split()[4] for m in took} >= {killed_key.rsplit("/", 1)[1][:-5],
                                                        frozen_key.rsplit("/", 1)[1][:-5]}, took
    print(f"{parts} parts; takeover: {len(took)} units ({', '.join(m['message'] for m in took)}); survivor "
          f"ended {time.monotonic() - killed_at:.1f}s after the kill, {time.monotonic() - frozen_at:.1f}s "
          f"after the freeze (lease {LEASE}s)")

    before = {k: v for k, v in env.objects().items() if "/_parts/" in k or k.endswith(".zip")}
    signal_worker(env, frozen, 1, "zipper", signal.SIGCONT)
    resumed = finish({1: frozen})
    code, events = resumed[1]
    messages = [e.get("message", "") for e in events]
    assert code == 0, "\n".join(messages[-30:])
    assert any(m.startswith("lost the claim of zipper unit") for m in messages), messages[-30:]
    after = {k: v for k, v in env.objects().items() if "/_parts/" in k or k.endswith(".zip")}
    assert after == before, "the resumed worker changed a part or a record"
    uploaded = events_per_part({**survivor, **resumed}, "part uploaded")
    assert len(uploaded) == parts and max(uploaded.values()) == 1, uploaded

    victim = start(env, "python_unzipper.py", 0, **slow)
    victim_key = wait_for_claim(env, "unzipper", "w0")
    signal_worker(env, victim, 0, "unzipper", signal.SIGKILL)
    victim.communicate()
    # A part small enough can be restored between its claim and the kill (seen once in CI under
    # load): then its record is there and nothing is left to take over.
    stem_part = victim_key.split("/_claims/unzipper/", 1)[1]
    finished_before_kill = f"{env.prefix}_restored/{stem_part}" in env.objects()
    results = finish({n: start(env, "python_unzipper.py", n) for n in (1, 2)})
    assert_all_exit_0(results, "unzipper")
    assert finished_before_kill or any(e.get("message", "").startswith("took over unzipper unit")
                                       for _c, ev in results.values() for e in ev)
    assert_same_tree(env.source, env.destination)
    print(f"zipper: {len(uploaded)} parts uploaded once each; unzipper: "
          f"{len(events_per_part(results, 'part restored'))} parts restored by the two survivors")


def test_static_shards_on_a_server_without_conditional_writes(tmp_path, rclone_s3):
    """rclone serve s3 ignores If-None-Match and If-Match: two workers per stage with
    WORKER_COUNT=2 each do only their own folders; nothing is done twice."""
    endpoint, _data = rclone_s3
    bucket = f"shards-{os.getpid()}-{random.randrange(10**6)}"
    env = Env(endpoint=endpoint, bucket=bucket, tmp=str(tmp_path), vars=base_env(str(tmp_path), endpoint, bucket))
    env.s3.create_bucket(Bucket=bucket)
    os.makedirs(env.source)
    bulk_tree(env.source, folders=3, files=30)
    for script, counted in zip(SCRIPTS, ("mapped ", "part uploaded", "part restored")):
        procs = {n: subprocess.Popen([sys.executable, os.path.join(ROOT, script)],
                                     env={**worker_env(env, n), "WORKER_COUNT": "2"}, cwd=env.tmp,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for n in range(2)}
        results = finish(procs)
        assert_all_exit_0(results, script)
        for n, (_c, events) in results.items():
            messages = [e.get("message", "") for e in events]
            assert any("static shard" in m for m in messages), messages[:10]
        counts = events_per_part(results, counted)
        assert counts and max(counts.values()) == 1, counts
        per_worker = [{(e.get("folder"), e.get("part")) for e in ev if e.get("message", "").startswith(counted)}
                      for _c, ev in results.values()]
        assert not (per_worker[0] & per_worker[1])
    assert_same_tree(env.source, env.destination)
    assert not any("/_claims/" in k for k in env.objects())
