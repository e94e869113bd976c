"""Claims on S3 (issue 9): take, renew, take over a stale claim, lose it, release it.

moto in-process enforces create-only and compare-and-swap writes as the server does; the
lease clock is replaced by a hand-driven one, so nothing here sleeps.
"""

from __future__ import annotations

import threading

import pytest
from botocore.stub import ANY, Stubber

import common_s3
from common_s3 import (Capabilities, ClaimLost, Claims, Layout, Records, Runtime, Skipped, shard_of)

BUCKET = "unit-bucket"
ENFORCED = Capabilities(create_only=True, compare_and_swap=True, send_conditions=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(common_s3, "lease_clock", c)
    return c


@pytest.fixture
def workers(s3, make_cfg):
    """``workers(n)`` -> n Claims objects of distinct workers on one moto bucket, lease 60 s."""
    made = []

    def make(n: int = 2, stage: str = "zipper") -> list[Claims]:
        out = []
        for i in range(n):
            records = Records(s3, make_cfg(WORKER_ID=f"w{i}", LEASE_SECONDS="60"))
            records.caps = ENFORCED
            runtime = Runtime()
            made.append(runtime)
            out.append(Claims(records, Layout("p/"), runtime, stage))
        return out

    yield make
    for runtime in made:
        runtime.stop.set()  # ends the renewal threads


def claim_body(claims: Claims, key: str) -> dict:
    return claims.records.get_json(key)


def test_one_worker_takes_a_unit_and_a_second_finds_it_held(workers, clock):
    a, b = workers(2)
    got = a.take("Photos", "Part1")
    assert not isinstance(got, Skipped)
    assert got.key == "p/_claims/zipper/Photos/Part1.json"
    assert claim_body(a, got.key)["worker"] == "w0"
    assert b.take("Photos", "Part1") == Skipped("held", "w0")


def test_a_stale_claim_is_taken_over_only_after_the_lease_on_the_observers_clock(workers, clock):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    assert isinstance(b.take("Photos", "Part1"), Skipped)  # first seen now
    clock.now += 59
    assert isinstance(b.take("Photos", "Part1"), Skipped)  # unchanged, but not for 60 s yet
    clock.now += 2
    mine = b.take("Photos", "Part1")
    assert not isinstance(mine, Skipped) and b.taken_over == 1
    assert claim_body(b, mine.key)["worker"] == "w1"
    # The old holder's next renewal is refused: its unit stops at once.
    assert a.renew(held) is False and held.lost.is_set() and "w1" in held.why


def test_renewals_change_the_claim_so_a_live_holder_is_never_taken_over(workers, clock):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    b.take("Photos", "Part1")
    for _ in range(5):
        clock.now += 30
        etag = held.etag
        assert a.renew(held) is True and held.etag != etag  # a new nonce: a new ETag, also on moto
        assert isinstance(b.take("Photos", "Part1"), Skipped)
    assert not held.lost.is_set()


def test_a_lost_claim_stops_its_units_thread(workers, clock):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    b.take("Photos", "Part1")
    clock.now += 61
    b.take("Photos", "Part1")
    a.runtime.local.claim = held
    a.runtime.check()  # not known yet
    a.renew(held)
    with pytest.raises(ClaimLost, match="Part1"):
        a.runtime.check()
    assert a.runtime.unit_lost() is held.lost


def test_confirm_renews_an_old_claim_and_raises_once_it_is_lost(workers, clock):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    etag = held.etag
    a.confirm(held)  # just taken: nobody can have it, no request
    assert held.etag == etag
    clock.now += 20
    a.confirm(held)  # older than a quarter of the lease: renewed
    assert held.etag != etag
    b.take("Photos", "Part1")
    clock.now += 61
    b.take("Photos", "Part1")
    with pytest.raises(ClaimLost):
        a.confirm(held)


def test_release_deletes_only_our_own_claim(workers, clock):
    a, b = workers(2)
    held = a.take("Photos", "Part1")
    a.release(held)
    assert a.records.head(held.key) is None
    # Taken over meanwhile: the old holder's release leaves the new claim alone.
    held = a.take("Photos", "Part1")
    b.take("Photos", "Part1")
    clock.now += 61
    theirs = b.take("Photos", "Part1")
    a.release(held)
    assert claim_body(b, theirs.key)["worker"] == "w1"


def test_run_skips_a_unit_another_worker_finished(workers, clock):
    a, = workers(1)
    ran = []
    assert a.run("Photos", "Part1", lambda: ran.append(1), done=lambda: True) == Skipped("done")
    assert ran == [] and a.records.head("p/_claims/zipper/Photos/Part1.json") is None


def test_run_turns_a_failure_after_a_lost_claim_into_lost(workers, clock):
    a, b = workers(2)

    def unit():
        b.take("Photos", "Part1")
        clock.now += 61
        b.take("Photos", "Part1")
        a.renew(a.current())
        a.runtime.check()

    got = a.run("Photos", "Part1", unit, done=lambda: False)
    assert isinstance(got, Skipped) and got.why == "lost"
    assert claim_body(b, "p/_claims/zipper/Photos/Part1.json")["worker"] == "w1"


def test_run_passes_on_a_real_failure_and_releases(workers, clock):
    a, = workers(1)

    def unit():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        a.run("Photos", "Part1", unit, done=lambda: False)
    assert a.records.head("p/_claims/zipper/Photos/Part1.json") is None
    assert a.runtime.local.claim is None


def test_without_enforced_writes_there_are_no_claims(s3, make_cfg):
    records = Records(s3, make_cfg(WORKER_ID="w0"))
    claims = Claims(records, Layout("p/"), Runtime(), "zipper")
    assert not claims.enabled
    assert claims.run("Photos", "Part1", lambda: "did it", done=lambda: True) == "did it"
    assert list(records.list_keys("p/_claims/")) == []


def test_the_renewal_thread_keeps_a_long_unit_claimed(s3, make_cfg):
    """Real clock, lease 1.2 s: a unit of 1.5 s is renewed on the way and never lost."""
    records = Records(s3, make_cfg(WORKER_ID="w0", LEASE_SECONDS="1.2"))
    records.caps = ENFORCED
    runtime = Runtime()
    claims = Claims(records, Layout("p/"), runtime, "zipper")
    etags = []

    def unit():
        for _ in range(15):
            etags.append(claims.current().etag)
            runtime.check()
            threading.Event().wait(0.1)
        return "ok"

    try:
        assert claims.run("Photos", "Part1", unit, done=lambda: False) == "ok"
    finally:
        runtime.stop.set()
    assert len(set(etags)) >= 2


# 409 ConditionalRequestConflict: no local server sends it, so botocore's Stubber does.

@pytest.fixture
def stubbed_claims(stub_client, make_cfg, clock):
    records = Records(stub_client, make_cfg(WORKER_ID="w0", LEASE_SECONDS="60"))
    records.caps = ENFORCED
    runtime = Runtime()
    with Stubber(stub_client) as stubber:
        yield Claims(records, Layout("p/"), runtime, "zipper"), stubber
    runtime.stop.set()


def conflict(stubber, **params):
    stubber.add_client_error("put_object", service_error_code="ConditionalRequestConflict",
                             http_status_code=409, expected_params={
                                 "Bucket": BUCKET, "Key": "p/_claims/zipper/S/Part1.json", "Body": ANY,
                                 "ContentMD5": ANY, "ContentType": ANY, **params})


def test_a_conflict_on_take_is_tried_again(stubbed_claims, monkeypatch):
    monkeypatch.setattr(common_s3.time, "sleep", lambda s: None)
    claims, stubber = stubbed_claims
    conflict(stubber, IfNoneMatch="*")
    stubber.add_response("put_object", {"ETag": '"e1"'})
    got = claims.take("S", "Part1")
    assert not isinstance(got, Skipped) and got.etag == "e1"


def test_conflicts_on_renewal_keep_the_claim_until_most_of_the_lease_is_gone(stubbed_claims, monkeypatch,
                                                                           clock):
    monkeypatch.setattr(common_s3.time, "sleep", lambda s: None)
    claims, stubber = stubbed_claims
    stubber.add_response("put_object", {"ETag": '"e1"'})
    held = claims.take("S", "Part1")
    # Four conflicts end one renewal as "refused" (RecordExists): the claim is read back, and
    # it still holds our nonce only if our write landed. Here it is someone else's: lost.
    for _ in range(4):
        conflict(stubber, IfMatch='"e1"')
    stubber.add_response("get_object", {"ETag": '"e2"', "Body": _body({"worker": "w9", "nonce": "x"})})
    clock.now += 25
    assert claims.renew(held) is False and held.lost.is_set() and "w9" in held.why


def test_a_renewal_that_landed_despite_a_refusal_keeps_the_claim(stubbed_claims, monkeypatch, clock):
    claims, stubber = stubbed_claims
    stubber.add_response("put_object", {"ETag": '"e1"'})
    held = claims.take("S", "Part1")
    sent = {}

    def remember(params, **_kw):
        import json
        sent.update(json.loads(params["Body"]))

    stubber.client.meta.events.register("before-parameter-build.s3.PutObject", remember)
    stubber.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412)
    clock.now += 25
    stubber.add_response("get_object", {"ETag": '"e3"', "Body": _lazy(sent)})
    assert claims.renew(held) is True and held.etag == "e3" and not held.lost.is_set()


def _body(obj):
    import io
    import json
    from botocore.response import StreamingBody
    raw = json.dumps(obj).encode()
    return StreamingBody(io.BytesIO(raw), len(raw))


class _lazy:
    """A body built when read: the nonce of the renewal the test could not know in advance."""

    def __init__(self, sent: dict):
        self.sent = sent

    def read(self, *_a):
        import json
        return json.dumps(self.sent).encode()


# Static shards

def test_shards_are_stable_everywhere_and_cover_every_folder():
    # Fixed values: the same on every machine and Python (no hash randomisation).
    names = ("Photos", "Documents", "", "Ünïcødé 2020")
    assert [shard_of(n, 3) for n in names] == [0, 0, 1, 0]
    assert [shard_of(n, 2) for n in names] == [0, 0, 0, 1]
    assert shard_of("Photos", 3) == int.from_bytes(
        __import__("hashlib").sha256(b"Photos").digest()[:8], "big") % 3
    names = [f"folder {i}" for i in range(300)]
    counts = [sum(1 for n in names if shard_of(n, 3) == k) for k in range(3)]
    assert sum(counts) == 300 and min(counts) > 70


def test_claims_of_a_killed_earlier_run_on_this_work_dir_are_taken_at_once(workers, clock):
    """The instance lock hands each run the tokens of the runs before it on this WORK_DIR; they
    have all ended, so their claims need not wait for the lease."""
    dead, later, stranger = workers(3)
    dead.runtime.run_token, later.runtime.run_token = "run-a", "run-b"
    later.runtime.dead_runs = {"run-a"}
    dead.take("Photos", "Part1")
    dead.take("Photos", "Part2")
    stranger.runtime.run_token = "run-c"
    stranger.take("Photos", "Part3")
    got = later.take("Photos", "Part1")
    assert not isinstance(got, Skipped) and claim_body(later, got.key)["run"] == "run-b"
    assert isinstance(later.take("Photos", "Part3"), Skipped)  # another machine's: the lease applies


def test_a_create_whose_answer_was_lost_is_still_ours(stubbed_claims):
    """Through a flaky network the create lands, its answer is lost, botocore sends it again
    and meets 412: the claim holds our own nonce, so it is ours, not another worker's."""
    claims, stubber = stubbed_claims
    sent = {}

    def remember(params, **_kw):
        import json
        sent.update(json.loads(params["Body"]))

    stubber.client.meta.events.register("before-parameter-build.s3.PutObject", remember)
    stubber.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412)
    stubber.add_response("get_object", {"ETag": '"e7"', "Body": _lazy(sent)})
    got = claims.take("S", "Part1")
    assert not isinstance(got, Skipped) and got.etag == "e7"
