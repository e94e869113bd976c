"""retry_call (attempts, time budget, backoff, what is never retried) and is_retryable_s3."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading

import pytest
from botocore.exceptions import (ConnectionClosedError, EndpointConnectionError, NoCredentialsError,
                                 ReadTimeoutError)

from common_s3 import (Interrupted, MigrationError, RcloneError, S3AuthError, S3Error, StopRequested,
                       is_disk_full, is_retryable_s3, retry_call, RetryPolicy)


class Script:
    """A callable that raises the given errors in turn, then returns ``result``."""

    def __init__(self, *errors: BaseException, result: object = "done"):
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def retry(fn, *, what, stop=None, is_retryable=None, **policy):
    """retry_call with the policy's fields given as keywords."""
    extra = {"is_retryable": is_retryable} if is_retryable is not None else {}
    return retry_call(fn, what=what, policy=RetryPolicy(**policy), stop=stop, **extra)


class Sleeps(list):
    """A recording ``sleep`` that never sleeps."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def call(fn, *, attempts=3, max_duration_s=1000.0, sleep=None, rand=lambda: 0.5, clock=None, **kw):
    return retry(fn, what="test op", attempts=attempts, max_duration_s=max_duration_s,
                      sleep=sleep if sleep is not None else Sleeps(), rand=rand,
                      clock=clock or (lambda: 0.0), **kw)


RETRYABLE = ["SlowDown", "503", "InternalError", "EndpointConnection"]


@pytest.fixture
def make_retryable(client_error):
    """A fresh retryable error of the given kind, so each attempt's error is its own object."""

    def make(kind: str) -> Exception:
        if kind == "EndpointConnection":
            return EndpointConnectionError(endpoint_url="http://s3")
        return client_error(kind, 500 if kind == "InternalError" else 503)

    return make


# Retrying

@pytest.mark.parametrize("kind", RETRYABLE)
def test_retryable_errors_are_retried_until_success(make_retryable, kind):
    sleeps = Sleeps()
    fn = Script(make_retryable(kind), make_retryable(kind))
    assert call(fn, attempts=3, sleep=sleeps) == "done"
    assert fn.calls == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("kind", RETRYABLE)
def test_last_error_is_reraised_after_all_attempts(make_retryable, kind):
    errors = [make_retryable(kind) for _ in range(4)]
    fn = Script(*errors)
    sleeps = Sleeps()
    with pytest.raises(type(errors[0])) as info:
        call(fn, attempts=4, sleep=sleeps)
    assert info.value is errors[-1]
    assert fn.calls == 4
    assert len(sleeps) == 3


def test_the_last_of_different_errors_is_reraised(client_error):
    first, second, last = client_error("SlowDown", 503), client_error("InternalError", 500), \
        client_error("ServiceUnavailable", 503)
    with pytest.raises(type(last)) as info:
        call(Script(first, second, last), attempts=3)
    assert info.value is last


@pytest.mark.parametrize("code, status", [("AccessDenied", 403), ("NoSuchKey", 404),
                                          ("PreconditionFailed", 412), ("412", 412),
                                          ("InvalidArgument", 400), ("NoSuchBucket", 404)])
def test_final_answers_are_not_retried(client_error, code, status):
    error = client_error(code, status)
    sleeps = Sleeps()
    fn = Script(error)
    with pytest.raises(type(error)) as info:
        call(fn, attempts=5, sleep=sleeps)
    assert info.value is error
    assert fn.calls == 1
    assert sleeps == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1), Interrupted(signal.SIGTERM),
                                 GeneratorExit()])
def test_base_exceptions_are_never_retried(exc):
    fn = Script(exc)
    sleeps = Sleeps()
    retry_all = lambda e: True  # noqa: E731 - even a predicate that says yes
    with pytest.raises(type(exc)):
        call(fn, attempts=5, sleep=sleeps, is_retryable=retry_all)
    assert fn.calls == 1
    assert sleeps == []


def test_custom_predicate(client_error):
    fn = Script(ValueError("flaky"), ValueError("flaky"))
    assert call(fn, attempts=3, is_retryable=lambda e: isinstance(e, ValueError)) == "done"
    fn = Script(ValueError("final"))
    with pytest.raises(ValueError):
        call(fn, attempts=3, is_retryable=lambda e: False)
    assert fn.calls == 1


def test_one_attempt_means_no_retry(client_error):
    fn = Script(client_error("SlowDown", 503))
    sleeps = Sleeps()
    with pytest.raises(Exception):
        call(fn, attempts=1, sleep=sleeps)
    assert fn.calls == 1 and sleeps == []


# Time budget and delays

class Clock:
    """A monotonic clock that moves only when the recorded sleep is called."""

    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_time_budget_stops_retrying(client_error):
    clock = Clock()
    error = client_error("InternalError", 500)
    fn = Script(*[error] * 50)
    with pytest.raises(type(error)):
        retry(fn, what="op", attempts=50, max_duration_s=10, base_delay_s=1, max_delay_s=100,
                   sleep=clock.sleep, clock=clock, rand=lambda: 1.0)
    # Delays 1, 2, 4 fit in 10 s; the next (8) would pass the budget, so it gives up instead.
    assert clock.sleeps == [1, 2, 4]
    assert fn.calls == 4
    assert clock.now - 100.0 <= 10


def test_time_already_spent_counts(client_error):
    clock = Clock()
    error = client_error("InternalError", 500)

    def slow_failure():
        clock.now += 9.5  # the call itself takes 9.5 s
        raise error
    with pytest.raises(type(error)):
        retry(slow_failure, what="op", attempts=5, max_duration_s=10, base_delay_s=1,
                   sleep=clock.sleep, clock=clock, rand=lambda: 1.0)
    assert clock.sleeps == []


def test_exponential_backoff_with_cap(client_error):
    sleeps = Sleeps()
    error = client_error("InternalError", 500)
    with pytest.raises(type(error)):
        retry(Script(*[error] * 8), what="op", attempts=8, max_duration_s=1e9, base_delay_s=0.5,
                   max_delay_s=5, sleep=sleeps, rand=lambda: 1.0, clock=lambda: 0.0)
    assert sleeps == [0.5, 1, 2, 4, 5, 5, 5]


def test_full_jitter_stays_between_half_and_whole_cap(client_error):
    error = client_error("InternalError", 500)
    low, high = Sleeps(), Sleeps()
    for rand, sleeps in ((lambda: 0.0, low), (lambda: 1.0, high)):
        with pytest.raises(type(error)):
            retry(Script(*[error] * 4), what="op", attempts=4, max_duration_s=1e9,
                       base_delay_s=1, sleep=sleeps, rand=rand, clock=lambda: 0.0)
    assert high == [1, 2, 4]
    assert low == [0.5, 1, 2]


def test_throttling_waits_longer_than_plain_5xx(client_error):
    throttled, failed = Sleeps(), Sleeps()
    for code, status, sleeps in (("SlowDown", 503, throttled), ("InternalError", 500, failed)):
        error = client_error(code, status)
        with pytest.raises(type(error)):
            retry(Script(*[error] * 4), what="op", attempts=4, max_duration_s=1e9,
                       sleep=sleeps, rand=lambda: 1.0, clock=lambda: 0.0)
    assert len(throttled) == len(failed) == 3
    assert all(t > f for t, f in zip(throttled, failed))
    assert throttled == [4 * f for f in failed]


def test_wrapped_throttling_is_recognised(client_error):
    wrapped = S3Error("PutObject", "b", "k", client_error("SlowDown", 503))
    plain = S3Error("PutObject", "b", "k", client_error("InternalError", 500))
    sleeps = {}
    for name, error in (("throttle", wrapped), ("plain", plain)):
        sleeps[name] = Sleeps()
        with pytest.raises(S3Error):
            retry(Script(error, error), what="op", attempts=2, max_duration_s=1e9,
                       sleep=sleeps[name], rand=lambda: 1.0, clock=lambda: 0.0)
    assert sleeps["throttle"][0] > sleeps["plain"][0]


def test_logs_each_attempt_at_warning(client_error, caplog):
    error = client_error("InternalError", 500)
    with caplog.at_level(logging.WARNING, logger="common_s3"):
        call(Script(error, error), attempts=3)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "attempt 1/3" in messages[0] and "attempt 2/3" in messages[1]
    assert "test op" in messages[0] and "InternalError" in messages[0]


def test_stop_event_ends_the_wait():
    stop = threading.Event()
    stop.set()
    fn = Script(TimeoutError("slow"))
    with pytest.raises(StopRequested) as info:
        retry(fn, what="op", attempts=5, max_duration_s=1e9, stop=stop)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert fn.calls == 1


def test_stop_event_wait_is_used_instead_of_sleep():
    class NoWait:
        def __init__(self):
            self.waits = []

        def wait(self, timeout):
            self.waits.append(timeout)
            return False
    stop = NoWait()
    sleeps = Sleeps()
    assert retry(Script(TimeoutError(), TimeoutError()), what="op", attempts=3, max_duration_s=1e9,
                      sleep=sleeps, rand=lambda: 1.0, stop=stop) == "done"
    assert stop.waits == [0.5, 1.0]
    assert sleeps == []


# Classification

@pytest.mark.parametrize("code, status, expected", [
    ("SlowDown", 503, True),
    ("503", 503, True),
    ("Throttling", 400, True),
    ("ThrottlingException", 400, True),
    ("RequestLimitExceeded", 400, True),
    ("TooManyRequests", 429, True),
    ("429", 429, True),
    ("InternalError", 500, True),
    ("500", 500, True),
    ("502", 502, True),
    ("504", 504, True),
    ("ServiceUnavailable", 503, True),
    ("RequestTimeout", 400, True),
    ("BadDigest", 400, True),
    ("IncompleteBody", 400, True),
    ("AccessDenied", 403, False),
    ("403", 403, False),
    ("InvalidAccessKeyId", 403, False),
    ("SignatureDoesNotMatch", 403, False),
    ("NoSuchKey", 404, False),
    ("404", 404, False),
    ("NoSuchBucket", 404, False),
    ("PreconditionFailed", 412, False),
    ("412", 412, False),
    ("InvalidArgument", 400, False),
    ("NotImplemented", 501, False),
    ("EntityTooSmall", 400, False),
])
def test_client_error_classification(client_error, code, status, expected):
    assert is_retryable_s3(client_error(code, status)) is expected
    assert is_retryable_s3(S3Error("GetObject", "b", "k", client_error(code, status))) is expected


@pytest.mark.parametrize("status, expected", [(500, True), (503, True), (502, True), (404, False),
                                              (403, False), (412, False)])
def test_status_only_client_error(client_error, status, expected):
    assert is_retryable_s3(client_error(None, status)) is expected


@pytest.mark.parametrize("exc, expected", [
    (EndpointConnectionError(endpoint_url="http://s3"), True),
    (ConnectionClosedError(endpoint_url="http://s3"), True),
    (ReadTimeoutError(endpoint_url="http://s3"), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (socket.timeout(), True),
    (NoCredentialsError(), False),
    (ValueError("x"), False),
    (MigrationError("x"), False),
    (OSError("disk"), False),
    (KeyError("Body"), False),
])
def test_other_error_classification(exc, expected):
    assert is_retryable_s3(exc) is expected


def test_wrapped_auth_error_is_not_retryable(client_error):
    assert is_retryable_s3(S3AuthError("GetObject", "b", "k", client_error("AccessDenied", 403))) is False
    assert is_retryable_s3(S3Error("GetObject", "b", "k",
                                   EndpointConnectionError(endpoint_url="http://s3"))) is True


# rclone's exit codes

@pytest.mark.parametrize("returncode, timed_out, retryable", [
    (1, False, True), (5, False, True), (6, False, True), (None, True, True),
    (2, False, False), (3, False, False), (4, False, False), (7, False, False), (9, False, False),
])
def test_rclone_error_retry_class(returncode, timed_out, retryable):
    err = RcloneError("copy", returncode, ["rclone", "copy"], "ERROR : x: failed\n", timed_out=timed_out)
    assert err.retryable is retryable
    assert err.exit_code == 3


@pytest.mark.parametrize("tail", ["ERROR : f: write /w/f: no space left on device",
                                  "ERROR : f: Failed to copy: file too big for remaining disk space"])
def test_rclone_running_out_of_disk_is_not_retried(tail):
    err = RcloneError("copy", 1, ["rclone"], tail)
    assert err.disk_full is True
    assert err.retryable is False
    assert is_disk_full(err)


def test_disk_full_classification():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RcloneError("copy", 5, ["rclone"], "ERROR : network down"))
    assert not is_disk_full(ValueError("x"))


def test_rclone_error_message_shows_the_last_lines():
    err = RcloneError("lsjson of 'src:'", 3, ["rclone"], "one\ntwo\nthree\nfour\n")
    assert str(err) == "rclone lsjson of 'src:' exited 3: two | three | four"
    assert "timed out" in str(RcloneError("copy", None, ["rclone"], "", timed_out=True))
