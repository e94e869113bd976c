"""Claims against MemoryRecords: what test_claims.py (moto, botocore's Stubber) finds awkward.

Several workers share one in-memory store (``MemoryRecords.twin``); the store's fault hook
makes a request fail before or after it lands; the lease clock is a hand-driven one. Unless
a test asks for renewing workers, each runtime is stopped from the start, so the renewal
thread ends at once and only the test renews: nothing here depends on timing but one test
of that thread, which waits a fraction of a second for it.
"""

from __future__ import annotations

import threading
import time

import pytest
from botocore.exceptions import ReadTimeoutError

import common_s3
from common_s3 import ClaimLost, Claims, Layout, Runtime, S3Error, Skipped
from memstore import Clock, MemoryRecords

KEY = "p/_claims/zipper/Photos/Part1.json"


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The lease clock of every worker here (they share this process)."""
    c = Clock(1000.0)
    monkeypatch.setattr(common_s3, "lease_clock", c)
    return c


@pytest.fixture
def server_clock() -> Clock:
    """The store's clock (LastModified, age_s), unrelated to the lease clock."""
    return Clock(1_700_000_000.0)


@pytest.fixture
def workers(make_cfg, instant_stop, server_clock):
    """``workers(n, lease=60, renewing=False)`` -> n Claims of workers w0.. on one store."""
    made: list[Runtime] = []

    def make(n: int = 2, *, lease: float = 60, renewing: bool = False) -> list[Claims]:
        first = MemoryRecords(make_cfg(WORKER_ID="w0", LEASE_SECONDS=str(lease)), stop=instant_stop,
                              clock=server_clock)
        out = []
        for i in range(n):
            records = first if i == 0 else first.twin(make_cfg(WORKER_ID=f"w{i}", LEASE_SECONDS=str(lease)))
            runtime = Runtime()
            if not renewing:
                runtime.stop.set()
            made.append(runtime)
            out.append(Claims(records, Layout("p/"), runtime, "zipper"))
        return out

    yield make
    for runtime in made:
        runtime.stop.set()


def holder(claims: Claims) -> str:
    return claims.records.get_json(KEY)["worker"]


def test_two_workers_racing_for_the_same_units_never_both_win(workers, clock):
    a, b = workers(2)
    for n in range(20):
        start = threading.Barrier(2)
        got: dict[str, object] = {}

        def take(claims: Claims) -> None:
            start.wait()
            got[claims.cfg.worker_id] = claims.take("Photos", f"Part{n}")
        threads = [threading.Thread(target=take, args=(c,)) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [w for w, g in got.items() if not isinstance(g, Skipped)]
        assert len(winners) == 1, got
        loser = "w1" if winners == ["w0"] else "w0"
        assert got[loser] == Skipped("held", winners[0])


def test_the_lease_is_counted_from_the_observers_first_sight_not_the_claims_age(workers, clock,
                                                                               server_clock):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    server_clock.now += 3600  # by the server's clock the claim is an hour old...
    assert b.records.get(KEY).age_s == 3600
    clock.now += 100  # ...and its holder has not renewed it for 100 s: neither counts
    assert b.take("Photos", "Part1") == Skipped("held", "w0")  # first seen now
    clock.now += 59
    assert b.take("Photos", "Part1") == Skipped("held", "w0")
    assert a.renew(held)  # a change starts the observer's count again
    clock.now += 2
    assert b.take("Photos", "Part1") == Skipped("held", "w0")
    clock.now += 59
    assert b.take("Photos", "Part1") == Skipped("held", "w0")
    clock.now += 2
    assert not isinstance(b.take("Photos", "Part1"), Skipped) and holder(b) == "w1"


def test_a_takeover_that_races_a_renewal_is_refused(workers, clock, monkeypatch):
    """The holder renews between the observer's read and its compare-and-swap: the swap is
    refused, so the claim stays with its live holder."""
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    b.take("Photos", "Part1")
    clock.now += 61
    read = b.records.get

    def read_then_holder_renews(key: str):
        got = read(key)
        assert a.renew(held)
        return got
    monkeypatch.setattr(b.records, "get", read_then_holder_renews)
    assert b.take("Photos", "Part1") == Skipped("held", "w0")
    assert b.taken_over == 0 and holder(a) == "w0"
    monkeypatch.setattr(b.records, "get", read)
    assert a.renew(held) and not held.lost.is_set()


def test_the_renewal_thread_finds_a_takeover_and_the_unit_stops(workers, clock):
    """Lease 2.4 s: the renewal thread ticks every 0.2 s of real time, and the fake clock says
    the lease is long gone; its refused renewal stops the unit, and confirm raises."""
    a, b = workers(2, lease=2.4, renewing=True)
    seen = {}

    def unit() -> str:
        claim = a.current()
        b.take("Photos", "Part1")
        with claim.lock:  # the renewal thread waits here: it cannot renew before the takeover
            clock.now += 3
            assert not isinstance(b.take("Photos", "Part1"), Skipped)
        deadline = time.monotonic() + 5
        while not claim.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["claim"] = claim
        a.runtime.check()  # raises ClaimLost
        return "finished"

    assert a.run("Photos", "Part1", unit, done=lambda: False) == Skipped("lost", "taken over by w1")
    with pytest.raises(ClaimLost):
        a.confirm(seen["claim"])
    assert holder(b) == "w1"  # the lost claim's release left the new holder's alone


def test_release_deletes_with_the_latest_etag_and_a_lost_claim_sends_nothing(workers, clock):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    for _ in range(2):
        clock.now += 30
        assert a.renew(held)
    a.release(held)
    assert a.records.head(KEY) is None
    held = a.take("Photos", "Part1")
    b.take("Photos", "Part1")
    clock.now += 61
    theirs = b.take("Photos", "Part1")
    assert a.renew(held) is False
    before = a.records.requests
    a.release(held)
    assert a.records.requests == before
    assert b.records.get(KEY).etag == theirs.etag


def test_a_failed_release_leaves_a_claim_only_this_run_takes_back_at_once(workers, clock, client_error):
    a, b = workers(2)
    a.runtime.run_token, b.runtime.run_token = "run-a", "run-b"
    held = a.take("Photos", "Part1")
    a.records.fail("DeleteObject", client_error("InternalError", 500, "DeleteObject"))
    a.release(held)  # logged, not raised: the claim goes stale after the lease
    assert holder(a) == "w0"
    assert b.take("Photos", "Part1") == Skipped("held", "w0")
    again = a.take("Photos", "Part1")
    assert not isinstance(again, Skipped) and a.taken_over == 1


def test_a_create_whose_answer_was_lost_is_ours_by_its_nonce(workers, clock, client_error):
    """The PUT landed; botocore's retry of it met 412. The claim holds our nonce: ours."""
    a, b = workers(2)
    a.records.fail("PutObject", client_error("PreconditionFailed", 412, "PutObject"), landed=True)
    got = a.take("Photos", "Part1")
    assert not isinstance(got, Skipped) and got.etag == a.records.get(KEY).etag
    assert b.take("Photos", "Part1") == Skipped("held", "w0")
    clock.now += 30
    assert a.renew(got) and not got.lost.is_set()


def test_a_create_that_landed_but_failed_is_taken_back_at_once_by_its_own_run(workers, clock):
    a, b = workers(2)
    a.runtime.run_token, b.runtime.run_token = "run-a", "run-b"
    a.records.fail("PutObject", ReadTimeoutError(endpoint_url="memstore"), landed=True)
    with pytest.raises(S3Error):
        a.take("Photos", "Part1")
    assert holder(a) == "w0"
    assert b.take("Photos", "Part1") == Skipped("held", "w0")
    assert not isinstance(a.take("Photos", "Part1"), Skipped)


def test_a_renewal_that_landed_but_failed_keeps_the_claim(workers, clock):
    a, = workers(1)
    held = a.take("Photos", "Part1")
    clock.now += 20
    a.records.fail("PutObject", ReadTimeoutError(endpoint_url="memstore"), landed=True)
    assert a.renew(held)  # "could not renew ... trying again"
    clock.now += 20
    assert a.renew(held), held.why  # was lost, "taken over by w0", by itself


def test_a_takeover_that_races_a_release_does_not_raise(workers, clock, monkeypatch):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    b.take("Photos", "Part1")
    clock.now += 61
    read = b.records.get

    def read_then_holder_releases(key: str):
        got = read(key)
        a.release(held)
        return got
    monkeypatch.setattr(b.records, "get", read_then_holder_releases)
    got = b.take("Photos", "Part1")  # raised KeyMissing from the If-Match PUT
    assert isinstance(got, Skipped) or holder(b) == "w1"
