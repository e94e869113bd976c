"""InstanceLock: the host-local flock on WORK_DIR, its holder record, waiting and takeover.

Two InstanceLock objects in one process conflict like two processes would: flock belongs
to the open file description, and each acquire opens the file anew.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

from common_s3 import _start_time, EXIT_TEMPORARY, InstanceLock, LockHeldError, Runtime, end_orphans


class Clock:
    """A fake monotonic clock; ``sleep`` advances it and records the wait."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(len(self.sleeps))


def holder_of(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return json.loads(text) if text else {}


@pytest.fixture
def work(tmp_path):
    return str(tmp_path / "work")


@pytest.fixture
def held(work):
    lock = InstanceLock(work, "zipper")
    lock.acquire()
    yield lock
    lock.release()


def test_acquire_writes_the_holder(work, held):
    assert held.path == os.path.join(work, ".zipper.lock")
    holder = holder_of(held.path)
    assert holder["pid"] == os.getpid()
    assert holder["host"] == socket.gethostname()
    assert holder["started_at"]


def test_second_instance_is_refused_naming_the_holder(work, held):
    other = InstanceLock(work, "zipper")
    with pytest.raises(LockHeldError) as info:
        other.acquire()
    err = info.value
    assert err.exit_code == EXIT_TEMPORARY == 75
    assert str(os.getpid()) in str(err)
    assert socket.gethostname() in str(err)
    assert held.path in str(err)
    assert err.holder["pid"] == os.getpid()
    assert other.fd is None
    # The refused instance did not disturb the holder's record.
    assert holder_of(held.path)["pid"] == os.getpid()


def test_refused_acquire_leaks_no_file_descriptor(work, held):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(LockHeldError):
            InstanceLock(work, "zipper").acquire()
    assert len(os.listdir("/proc/self/fd")) == before


def test_other_scripts_have_their_own_lock(work, held):
    with InstanceLock(work, "unzipper"), InstanceLock(work, "mapper"):
        pass


def test_timeout_waits_then_gives_up(work, held):
    clock = Clock()
    other = InstanceLock(work, "zipper", timeout_s=5, sleep=clock.sleep, clock=clock)
    with pytest.raises(LockHeldError) as info:
        other.acquire()
    assert info.value.exit_code == 75
    assert clock.sleeps, "it must wait before giving up"
    assert all(0 < s <= 1.0 for s in clock.sleeps)
    assert clock.now - 1000.0 == pytest.approx(5, abs=0.06)


def test_timeout_waits_for_the_holder_to_finish(work, held):
    clock = Clock()
    clock.on_sleep = lambda n: held.release() if n == 3 else None
    other = InstanceLock(work, "zipper", timeout_s=60, sleep=clock.sleep, clock=clock)
    other.acquire()
    try:
        assert len(clock.sleeps) == 3
        assert holder_of(other.path)["pid"] == os.getpid()
    finally:
        other.release()


def test_zero_timeout_never_sleeps(work, held):
    clock = Clock()
    with pytest.raises(LockHeldError):
        InstanceLock(work, "zipper", timeout_s=0, sleep=clock.sleep, clock=clock).acquire()
    assert clock.sleeps == []


def test_release_lets_another_acquire_and_keeps_the_file(work):
    first = InstanceLock(work, "zipper")
    first.acquire()
    first.release()
    assert os.path.exists(first.path)
    assert "pid" not in holder_of(first.path)  # no stale holder left behind, only earlier runs' tokens
    second = InstanceLock(work, "zipper")
    second.acquire()
    assert holder_of(second.path)["pid"] == os.getpid()
    second.release()
    assert os.path.exists(second.path)


def test_release_twice_is_harmless(work):
    lock = InstanceLock(work, "zipper")
    lock.acquire()
    lock.release()
    lock.release()
    assert lock.fd is None


def test_context_manager(work):
    with InstanceLock(work, "zipper") as lock:
        with pytest.raises(LockHeldError):
            InstanceLock(work, "zipper").acquire()
    assert lock.fd is None
    with InstanceLock(work, "zipper"):
        pass


def test_context_manager_releases_on_error(work):
    with pytest.raises(RuntimeError):
        with InstanceLock(work, "zipper"):
            raise RuntimeError("boom")
    with InstanceLock(work, "zipper"):
        pass


@pytest.mark.parametrize("stale", [
    json.dumps({"pid": 999999, "host": "elsewhere", "started_at": "2001-01-01T00:00:00+00:00"}),
    "{half-written",
    "",
])
def test_file_left_without_a_holder_is_taken_over(work, stale):
    os.makedirs(work)
    path = os.path.join(work, ".zipper.lock")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(stale)
    with InstanceLock(work, "zipper") as lock:
        holder = holder_of(lock.path)
        assert holder["pid"] == os.getpid()
        assert holder["host"] == socket.gethostname()


def test_a_longer_stale_record_is_fully_replaced(work):
    os.makedirs(work)
    path = os.path.join(work, ".zipper.lock")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"pid": 1, "host": "h" * 500}))
    with InstanceLock(work, "zipper"):
        assert holder_of(path)["host"] == socket.gethostname()


def test_unreadable_holder_still_gives_a_clear_refusal(work, held):
    with open(held.path, "w", encoding="utf-8") as fh:
        fh.write("{garbage")
    with pytest.raises(LockHeldError) as info:
        InstanceLock(work, "zipper").acquire()
    assert "pid ?" in str(info.value)


def test_work_dir_is_created(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    with InstanceLock(str(deep), "mapper") as lock:
        assert os.path.exists(lock.path)


# rclone children left behind by a killed run (WORK_DIR/.<script>.children)

def test_runtime_keeps_the_children_file_current(tmp_path):
    class Child:  # what Runtime uses of a Popen: its pid, and identity
        def __init__(self, pid):
            self.pid = pid
    path = tmp_path / ".zipper.children"
    runtime = Runtime(str(path))
    a, b = Child(101), Child(202)
    runtime.add_child(a)
    runtime.add_child(b)
    assert sorted(line.split()[0] for line in path.read_text().splitlines()) == ["101", "202"]
    runtime.remove_child(a)
    assert [line.split()[0] for line in path.read_text().splitlines()] == ["202"]
    runtime.remove_child(b)
    assert path.read_text() == ""


def test_orphaned_rclone_of_a_killed_run_is_ended(tmp_path):
    sleep = shutil.which("sleep")
    # argv[0] is what end_orphans looks at; Popen returns only after the exec.
    orphan = subprocess.Popen(["rclone-orphan", "30"], executable=sleep, start_new_session=True)
    bystander = subprocess.Popen(["not-rclone", "30"], executable=sleep, start_new_session=True)
    children = tmp_path / ".zipper.children"
    reused = subprocess.Popen(["rclone-reused-pid", "30"], executable=sleep, start_new_session=True)
    children.write_text(f"{orphan.pid} {_start_time(orphan.pid)}\n{bystander.pid} {_start_time(bystander.pid)}\n"
                        f"{os.getpid()} {_start_time(os.getpid())}\n999999999 1\n"
                        f"{reused.pid} 1\n")  # same PID, another process: its start time differs
    try:
        assert end_orphans(str(children)) == 1
        assert reused.poll() is None, "a process whose PID was reused was killed"
        assert orphan.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None
        assert not children.exists()
    finally:
        for proc in (orphan, bystander, reused):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_no_children_file_means_nothing_to_end(tmp_path):
    assert end_orphans(str(tmp_path / ".zipper.children")) == 0


def test_each_holder_knows_the_runs_before_it_on_this_work_dir(work):
    """Killed (lock dropped by the kernel, file left as it was) or ended cleanly, an earlier
    run's token is handed to every later holder: its claims on S3 can be taken at once."""
    first = InstanceLock(work, "zipper")
    first.acquire()
    os.close(first.fd)  # as kill -9 does: the flock goes, the holder's JSON stays
    second = InstanceLock(work, "zipper")
    second.acquire()
    assert second.earlier == [first.run] and holder_of(second.path)["run"] == second.run
    second.release()
    third = InstanceLock(work, "zipper")
    third.acquire()
    assert third.earlier == [first.run, second.run]
    third.release()
