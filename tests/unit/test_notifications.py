"""Notifications: the notices a run's end, a stall and systemd's OnFailure= send, with a fake sender."""

from __future__ import annotations

import logging

import pytest

import migrate
from common_s3 import (EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_TEMPORARY, EXIT_USAGE, EXIT_WAITING, Config,
                       ConfigError, Heartbeat, Layout, Notice, Notifier, Progress, Runtime, run_notice,
                       split_notify_urls)

SNAP = {"units_done": 3, "units_failed": 0, "bytes_done": 5 << 20, "elapsed_s": 42.0, "skipped": 1,
        "errors": {}, "current": [], "units_total": 3, "units_interrupted": 0}


class Sent(list):
    def __call__(self, url: str, notice: Notice) -> bool:
        self.append((url, notice))
        return True


def test_done_names_units_bytes_and_duration():
    notice = run_notice("zipper", EXIT_OK, SNAP)
    assert notice.kind == "success" and notice.title == "python_zipper.py: done"
    assert "3 units (5.0 MiB in 42s)" in notice.body and "1 already done" in notice.body


def test_nothing_done_waiting_a_lock_or_a_stop_tell_nobody():
    assert run_notice("zipper", EXIT_OK, {**SNAP, "units_done": 0}) is None
    assert run_notice("zipper", EXIT_WAITING, SNAP) is None
    assert run_notice("zipper", EXIT_TEMPORARY, SNAP, paused=None) is None
    assert run_notice("zipper", 143, SNAP) is None


def test_partly_done_names_what_failed_and_that_a_rerun_continues():
    snap = {**SNAP, "units_failed": 1, "errors": {"Photos": "img_003.jpg was deleted at SOURCE"}}
    notice = run_notice("zipper", EXIT_PARTIAL, snap)
    assert notice.kind == "warning" and "1 failed" in notice.body and "A rerun continues" in notice.body
    assert "Photos: img_003.jpg was deleted at SOURCE" in notice.body


def test_a_quota_pause_says_until_when():
    pause = {"retry_after": "2026-12-02T00:05:00Z", "message": "userRateLimitExceeded"}
    notice = run_notice("unzipper", EXIT_TEMPORARY, SNAP, paused=pause)
    assert notice.title == "python_unzipper.py: paused until 2026-12-02T00:05:00Z"
    assert "userRateLimitExceeded" in notice.body


@pytest.mark.parametrize("code, word", [(EXIT_FAILED, "failed"), (EXIT_USAGE, "a person must act")])
def test_a_failure_names_its_cause(code, word):
    notice = run_notice("mapper", code, {}, causes=["configuration: SPLIT_THRESHOLD='x' is not a number"])
    assert notice.kind == "failure" and word in notice.title and f"exit {code}" in notice.title
    assert "SPLIT_THRESHOLD" in notice.body


def test_a_notice_that_cannot_be_sent_is_logged_by_scheme_only(caplog):
    def refuse(url: str, notice: Notice) -> bool:
        raise OSError(f"cannot reach {url}")

    sent = Sent()
    notifier = Notifier(["json://user:s3cr3t@127.0.0.1:1/", "ntfy://tok3n@127.0.0.1/topic"], send=refuse)
    with caplog.at_level(logging.INFO):
        assert notifier.tell(Notice("info", "t", "b")) is False
        assert Notifier(["ntfy://tok3n@127.0.0.1/topic"], send=sent).tell(Notice("info", "t", "b")) is True
    assert "s3cr3t" not in caplog.text and "tok3n" not in caplog.text
    assert "not sent to json: OSError" in caplog.text and "sent to ntfy" in caplog.text
    assert sent == [("ntfy://tok3n@127.0.0.1/topic", Notice("info", "t", "b"))]


def test_notify_urls_split_and_a_bad_entry_is_named_without_its_value(tmp_path):
    assert split_notify_urls(" ntfy://127.0.0.1/b, mailto://u:p@h  json://x/ ") == (
        "ntfy://127.0.0.1/b", "mailto://u:p@h", "json://x/")
    base = {"SOURCE": str(tmp_path), "S3_BUCKET": "bkt", "WORK_DIR": str(tmp_path)}
    cfg = Config.from_env({**base, "NOTIFY_URLS": "ntfy://tok3n@127.0.0.1/t"}, "mapper")
    assert cfg.notify_urls == ("ntfy://tok3n@127.0.0.1/t",) and "tok3n" not in repr(cfg)
    with pytest.raises(ConfigError, match="NOTIFY_URLS: entry 2 of 2") as err:
        Config.from_env({**base, "NOTIFY_URLS": "ntfy://127.0.0.1/b s3cr3t"}, "mapper")
    assert "s3cr3t" not in str(err.value)


def test_a_stall_is_told_once_while_work_is_left_and_again_after_progress(tmp_path):
    cfg = Config.from_env({"SOURCE": str(tmp_path), "DESTINATION": str(tmp_path), "S3_BUCKET": "bkt",
                           "WORK_DIR": str(tmp_path), "STALL_MINUTES": "10"}, "zipper")
    now = [0.0]
    runtime = Runtime()
    runtime.progress = Progress(clock=lambda: now[0])
    sent = Sent()
    runtime.notifier = Notifier(["json://127.0.0.1:1/"], send=sent)
    beat = Heartbeat(None, Layout(""), cfg, runtime)
    runtime.progress.plan(4, 100)
    assert not beat.check_stall(0)
    assert not beat.check_stall(599)
    assert beat.check_stall(600) and not beat.check_stall(1200)
    assert len(sent) == 1 and "no unit finished for 10 minutes" in sent[0][1].body
    with runtime.progress.unit("Photos/Part1", "Photos", 10):
        pass
    assert not beat.check_stall(1300) and not beat.check_stall(1800) and beat.check_stall(1900)
    with runtime.progress.unit("Photos/Part2", "Photos", 10):
        pass
    runtime.progress.plan(2, 20)  # every unit done: waiting is no stall
    assert not beat.check_stall(2000) and not beat.check_stall(9000)


@pytest.mark.parametrize("result, status, told", [("exit-code", "1", False), ("exit-code", "75", False),
                                                   ("signal", "9", True), ("timeout", "", True)])
def test_systemd_on_failure_tells_what_the_script_could_not(result, status, told):
    sent = Sent()
    environ = {"NOTIFY_URLS": "json://127.0.0.1:1/", "MONITOR_SERVICE_RESULT": result, "MONITOR_EXIT_STATUS": status}
    assert migrate.notify_failure("python_zipper.service", environ, send=sent) == EXIT_OK
    assert len(sent) == int(told)
    if told:
        assert sent[0][1].title == "python_zipper.service failed" and result in sent[0][1].body


def test_migrate_tells_its_end_once_with_each_stage():
    import time
    from types import SimpleNamespace
    from common_s3 import HeartbeatRecord
    beat = HeartbeatRecord(script="zipper", worker="w", state="finished", units_done=4, bytes_done=3 << 20)
    m = SimpleNamespace(seen={"zipper": beat}, told="round 1: exit codes ...", started=time.monotonic() - 120)
    done = migrate.migration_notice(m, EXIT_OK)
    assert done.title == "migration restored and verified" and "in 2.0 min: zipper: 4 units (3.0 MiB)" in done.body
    assert migrate.migration_notice(m, EXIT_PARTIAL).kind == "warning"
    assert migrate.migration_notice(m, EXIT_TEMPORARY) is None  # another instance's lock: nobody needs to act
    assert migrate.migration_notice(m, 143) is None
    assert migrate.stage_env({}, False)["NOTIFY_BY_PARENT"] == "1"
