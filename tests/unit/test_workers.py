"""WorkerPool: lazy pulling of (label, task) pairs, results in pull order, errors as values."""

from __future__ import annotations

import threading

import pytest

from common_s3 import Runtime, StopRequested, WorkerPool


def test_every_task_runs_and_results_keep_pull_order():
    tasks = [(n, (lambda n=n: n * n)) for n in range(20)]
    results = WorkerPool(4, Runtime()).run(tasks)
    assert results == [(n, n * n) for n in range(20)]


def test_exceptions_are_returned_not_raised():
    boom = ValueError("boom")

    def fail():
        raise boom
    results = WorkerPool(2, Runtime()).run([("ok", lambda: 1), ("bad", fail), ("ok2", lambda: 2)])
    assert results == [("ok", 1), ("bad", boom), ("ok2", 2)]


def test_tasks_are_pulled_lazily():
    pulled = []
    ran = []

    def source():
        for n in range(3):
            pulled.append(n)
            yield n, (lambda n=n: ran.append((n, list(pulled))))
    WorkerPool(1, Runtime()).run(source())
    # With one worker, task n runs before task n+1 is even built.
    assert ran == [(0, [0]), (1, [0, 1]), (2, [0, 1, 2])]


def test_a_failing_source_is_reported_under_label_none():
    broken = RuntimeError("manifest unreadable")

    def source():
        yield "first", lambda: "done"
        raise broken
    results = WorkerPool(2, Runtime()).run(source())
    assert ("first", "done") in results
    assert (None, broken) in results


def test_nothing_starts_after_a_stop():
    runtime = Runtime()
    runtime.request_stop(15)
    ran = []
    results = WorkerPool(2, runtime).run([("a", lambda: ran.append("a"))])
    assert ran == [] and results == []
    with pytest.raises(StopRequested):
        runtime.check()


def test_workers_run_in_parallel():
    barrier = threading.Barrier(3, timeout=10)
    results = WorkerPool(3, Runtime()).run([(n, barrier.wait) for n in range(3)])
    assert sorted(r for _, r in results) == [0, 1, 2]  # all three met at the barrier at once


@pytest.mark.parametrize("workers", [0, -1])
def test_at_least_one_worker(workers):
    assert WorkerPool(workers, Runtime()).run([("a", lambda: 1)]) == [("a", 1)]


def test_bound_malloc_is_harmless_to_call_again():
    from common_s3 import bound_malloc
    bound_malloc()
    bound_malloc()
    block = bytearray(32 << 20)  # allocations still work after the threshold is fixed
    assert len(block) == 32 << 20
