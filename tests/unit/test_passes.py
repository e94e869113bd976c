"""Passes, the one pass loop of every stage, against MemoryRecords (conditional writes enforced):
units run under their claims, a unit another worker holds is looked at again after a pause, a
unit finished by another worker is skipped, a failed one is not retried by the same run, a reason
added with look_again_while makes another pass, and units are frozen values (no late binding)."""

from __future__ import annotations

import functools
import threading

import pytest

import common_s3
from common_s3 import Claims, Layout, Passes, Run, Runtime, Skipped, Unit
from memstore import MemoryRecords

LAYOUT = Layout("p/")


@pytest.fixture
def ctx(make_cfg, instant_stop, monkeypatch):
    """A Run on an in-memory store; pauses between passes do not sleep, they are counted."""
    records = MemoryRecords(make_cfg(WORKER_ID="w0", LEASE_SECONDS="600"), stop=instant_stop)
    runtime = Runtime()
    run = Run(records.cfg, records, LAYOUT, rclone=None, runtime=runtime, mode="claims")
    run.pauses = []
    real_wait = runtime.stop.wait

    def wait(seconds=None):  # the claims' renewal thread waits for real; a pass's pause is counted
        if threading.current_thread().name == "claims":
            return real_wait(seconds)
        run.pauses.append(seconds)
        return False
    monkeypatch.setattr(runtime.stop, "wait", wait)
    yield run
    runtime.stop.set()


def unit(ctx: Run, name: str, work, *, stem: str = "F") -> Unit:
    return Unit("zipper", "part", "F", stem, name, f"part {name}", work,
                (ctx.layout.part_record(stem, name),))


def record_done(ctx: Run, name: str, stem: str = "F") -> str:
    ctx.records.put_json(ctx.layout.part_record(stem, name), {"done": name})
    return name


def test_each_unit_runs_once_under_its_claim_and_the_claim_is_released(ctx):
    seen = []

    def work(name: str) -> str:
        claim_key = ctx.layout.claim("zipper", "F", name)
        seen.append((name, ctx.records.head(claim_key) is not None))
        return record_done(ctx, name)
    outcomes = Passes(ctx, "zipper").run(lambda: [unit(ctx, n, functools.partial(work, n)) for n in ("A", "B")])
    assert sorted(r for _u, r in outcomes) == ["A", "B"]
    assert sorted(seen) == [("A", True), ("B", True)]
    assert list(ctx.records.list_keys(LAYOUT.claims_root)) == []
    assert ctx.pauses == []


def test_units_are_frozen_values_bound_when_planned(ctx):
    """Each unit's work keeps the name it was planned with, though the loop variable moves on."""
    units = []
    for name in ("A", "B", "C"):
        units.append(unit(ctx, name, functools.partial(record_done, ctx, name)))
    outcomes = Passes(ctx, "zipper").run(lambda: units)
    assert sorted((u.name, r) for u, r in outcomes) == [("A", "A"), ("B", "B"), ("C", "C")]
    with pytest.raises(AttributeError):
        units[0].name = "other"


def test_a_unit_held_by_another_worker_is_looked_at_again_and_skipped_once_it_is_done(ctx, make_cfg):
    other = Claims(ctx.records.twin(make_cfg(WORKER_ID="w1", LEASE_SECONDS="600")), LAYOUT, Runtime(), "zipper")
    held = other.take("F", "A")
    assert not isinstance(held, Skipped)
    passes = []

    def plan():
        passes.append(1)
        if len(passes) == 2:  # while this worker paused, the other one finished the unit
            record_done(ctx, "A")
            other.release(held)
        return [unit(ctx, "A", functools.partial(pytest.fail, "ran a unit another worker did"))]
    outcomes = Passes(ctx, "zipper").run(plan)
    assert len(passes) == 2 and len(ctx.pauses) == 1
    assert [r for _u, r in outcomes] == [Skipped("done")]
    other.runtime.stop.set()


def test_a_failed_unit_is_reported_and_not_tried_again_in_the_same_run(ctx):
    calls = []

    def fails() -> None:
        calls.append(1)
        raise common_s3.MigrationError("broken")
    passes = Passes(ctx, "zipper")
    reasons = ["the stage before is still running"]
    passes.look_again_while(lambda: reasons.pop() if reasons else None)
    outcomes = passes.run(lambda: [unit(ctx, "A", fails)])
    assert len(calls) == 1
    assert [str(r) for _u, r in outcomes] == ["broken"]
    assert ("zipper", "F", "A") in passes.failed


def test_a_reason_to_look_again_makes_another_pass_over_a_fresh_plan(ctx):
    """The hook for stages that follow each other: a pass with nothing held plans again while
    the reason holds (here: the stage before publishes one more unit on each pass, and ends),
    and once more after it stops holding, for what was published last."""
    published = ["A"]
    passes = Passes(ctx, "zipper")
    passes.look_again_while(lambda: "the zipper is still running" if len(published) < 3 else None)

    def plan():
        todo = [unit(ctx, n, functools.partial(record_done, ctx, n)) for n in published
                if ctx.records.head(LAYOUT.part_record("F", n)) is None]
        if len(published) < 3:
            published.append("ABC"[len(published)])
        return todo
    outcomes = passes.run(plan)
    assert sorted(r for _u, r in outcomes) == ["A", "B", "C"]
    assert ctx.pauses == [0.5]  # one pause while the reason held; the last pass follows at once


def test_after_sees_every_outcome_and_its_value_is_the_units(ctx):
    seen = []

    def after(result):
        seen.append(result)
        return {"wrapped": result}
    u = Unit("zipper", "part", "F", "F", "A", "part A", functools.partial(record_done, ctx, "A"),
             (LAYOUT.part_record("F", "A"),), after=after)
    outcomes = Passes(ctx, "zipper").run(lambda: [u])
    assert seen == ["A"] and outcomes[0][1] == {"wrapped": "A"}


def test_a_pass_that_only_finds_work_still_waiting_does_not_shorten_the_pause(ctx):
    """While following another stage, a unit that reports "still waiting" on every pass is not
    progress: the pauses keep doubling instead of polling every half second for hours."""
    passes = Passes(ctx, "zipper")
    passes.progress_of = lambda result: result != "waiting"
    reasons = ["still running"] * 3
    passes.look_again_while(lambda: reasons.pop() if reasons else None)
    passes.run(lambda: [Unit("zipper", "folder", "F", "F", "folder", "folder F", lambda: "waiting")])
    assert ctx.pauses == [0.5, 1.0, 2.0]
