"""Upstream: whether the stage before this one may still publish work, from its heartbeats on S3
(MemoryRecords, whose clock dates them), and the wait for a stage not started yet."""

from __future__ import annotations

import os
import socket

import pytest

from common_s3 import Layout, Run, Runtime, Upstream
from memstore import Clock, MemoryRecords

LAYOUT = Layout("p/")


@pytest.fixture
def setup(make_cfg, instant_stop):
    server, local = Clock(1_700_000_000.0), Clock(100.0)

    def make(script: str = "unzipper", wait: str = "60"):
        records = MemoryRecords(make_cfg(script, UPSTREAM_WAIT=wait), stop=instant_stop, clock=server)
        ctx = Run(records.cfg, records, LAYOUT, rclone=None, runtime=Runtime())
        return ctx, Upstream(ctx, clock=local)
    return make, server, local


def beat(ctx: Run, script: str, worker: str, state: str, *, pid: int | None = None, host: str = "elsewhere") -> None:
    ctx.records.put_json(LAYOUT.heartbeat(script, worker), {
        "script": script, "worker": worker, "state": state, "host": host, "pid": pid or 1, "interval_s": 10})


def runs_then_ends(ctx: Run, up: Upstream, server: Clock, local: Clock, worker: str, seconds: float = 5) -> None:
    """A zipper seen running that ends ``seconds`` later: one last look, then no reason."""
    beat(ctx, "zipper", worker, "running")
    assert up.reason() == "python_zipper.py is still running"
    server.now += seconds
    local.now += seconds
    beat(ctx, "zipper", worker, "done")
    assert up.reason() == "python_zipper.py has ended; a last look at what it recorded"
    assert up.reason() is None


def test_a_running_zipper_is_a_reason_and_once_it_ends_there_is_none(setup):
    make, server, local = setup
    ctx, up = make()
    runs_then_ends(ctx, up, server, local, "z1")


def test_a_heartbeat_three_intervals_old_is_not_a_live_worker(setup):
    make, server, _local = setup
    ctx, up = make()
    beat(ctx, "zipper", "z1", "running")
    server.now += 31  # interval_s 10: stale after 30 s
    assert "not running yet" in up.reason()  # not seen in this run, and within UPSTREAM_WAIT


def test_a_killed_worker_of_this_machine_is_not_waited_for(setup):
    make, _server, _local = setup
    ctx, up = make()
    dead = 2 ** 22 + 12345  # above any pid_max default: no such process
    beat(ctx, "zipper", "z1", "running", pid=dead, host=socket.gethostname())
    assert up.reason() != "python_zipper.py is still running"
    beat(ctx, "zipper", "z2", "running", pid=os.getpid(), host=socket.gethostname())
    assert up.reason() == "python_zipper.py is still running"


def test_a_stage_not_started_yet_is_waited_for_only_upstream_wait(setup):
    make, _server, local = setup
    ctx, up = make(wait="60")
    assert up.reason() == "python_zipper.py is not running yet; waiting for it up to UPSTREAM_WAIT=60s"
    local.now += 61
    assert up.reason() is None


def test_a_stage_that_ended_before_this_run_started_is_not_waited_for_once_seen_running(setup):
    """An old heartbeat says nothing about this run; a zipper seen running, then ended, does."""
    make, server, local = setup
    ctx, up = make()
    beat(ctx, "zipper", "old", "done")
    server.now += 3600
    assert "not running yet" in up.reason()  # the old one ended before this run: keep waiting
    runs_then_ends(ctx, up, server, local, "new")


def test_the_mapper_running_keeps_the_unzipper_waiting_though_the_zipper_is_not_seen(setup):
    make, _server, _local = setup
    ctx, up = make()
    beat(ctx, "mapper", "m1", "running")
    assert up.reason() == "master_mapper.py is still running"


def test_the_mapper_has_no_stage_before_it(setup):
    make, _server, _local = setup
    _ctx, up = make("mapper")
    assert up.reason() is None


def test_a_stage_seen_running_then_ended_gives_one_last_look(setup):
    """It may end between this run's last listing of records and the look at its heartbeat:
    one more pass then sees what it recorded last (a lone unzipper never seen it running gets none)."""
    make, server, local = setup
    ctx, up = make()
    runs_then_ends(ctx, up, server, local, "z1", seconds=2)


def test_a_stage_that_ended_during_this_run_unseen_running_gives_one_last_look(setup):
    """Started together, the zipper may finish before this run's first look at its heartbeat,
    and after this run listed its records (seen with migrate.py's second round: exit 4 with the
    zipper's last parts recorded): it ended during this run, so one more pass."""
    make, server, local = setup
    ctx, up = make()
    server.now += 2
    local.now += 2
    beat(ctx, "zipper", "z1", "done")
    assert up.reason() == "python_zipper.py has ended; a last look at what it recorded"
    assert up.reason() is None
