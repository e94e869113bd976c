"""migrate.py's decisions after a round, its pauses and its --help (the rounds themselves run
the real scripts: tests/e2e/test_migrate.py)."""

from __future__ import annotations

import pytest

import migrate
from common_s3 import KNOWN_VARIABLES


@pytest.mark.parametrize("codes, paused, action, code, stage", [
    ({"mapper": 0, "zipper": 0, "unzipper": 0}, False, "done", 0, None),
    ({"mapper": 0, "zipper": 3, "unzipper": 4}, False, "again", 3, "zipper"),
    ({"mapper": 3, "zipper": 4, "unzipper": 4}, False, "again", 3, "mapper"),
    ({"mapper": 0, "zipper": 0, "unzipper": 4}, False, "again", 4, "unzipper"),
    ({"mapper": 0, "zipper": -9, "unzipper": 4}, False, "again", 4, "zipper"),  # killed by the kernel
    ({"mapper": 2, "zipper": 143, "unzipper": 143}, False, "stop", 2, "mapper"),  # the others were stopped
    ({"mapper": 0, "zipper": 1, "unzipper": 2}, False, "stop", 2, "zipper"),
    ({"mapper": 0, "zipper": 75, "unzipper": 75}, True, "quota", 75, "zipper"),
    ({"mapper": 75, "zipper": 75, "unzipper": 75}, False, "stop", 75, None),  # another instance's lock
])
def test_what_a_round_asks_for(codes, paused, action, code, stage):
    verdict = migrate.judge(codes, paused)
    assert (verdict.action, verdict.code) == (action, code)
    if action in ("again", "quota"):
        assert verdict.stage == stage


def test_pauses_between_rounds_double_up_to_a_quarter_hour():
    assert [migrate.pause_before(n, 60) for n in (2, 3, 4, 5)] == [60, 120, 240, 480]
    assert migrate.pause_before(9, 60) == 900


def test_help_lists_its_own_variables_and_the_stages_and_is_not_wider_than_the_scripts(capsys):
    assert migrate.main(["--help"], {}) == 0
    out = capsys.readouterr().out
    assert out.index("Usage:") < out.index("variables of this command") < out.index("Exit codes:")
    for name in ("RERUN_BACKOFF", "WAIT_FOR_QUOTA", "SOURCE", "DESTINATION", "UPSTREAM_WAIT"):
        assert name in out and name in KNOWN_VARIABLES
    assert max(len(line) for line in out.splitlines()) <= 103


def test_a_bad_value_of_its_own_is_named(capsys, tmp_path):
    env = {"SOURCE": str(tmp_path), "DESTINATION": str(tmp_path / "d"), "S3_BUCKET": "unit-bucket",
           "WORK_DIR": str(tmp_path / "w"), "MAX_ROUNDS": "many"}
    assert migrate.main([], env) == 2
    err = capsys.readouterr().err
    assert "MAX_ROUNDS" in err and "nothing was started" in err and "Traceback" not in err


def test_an_unknown_argument_is_usage(capsys):
    assert migrate.main(["--verify"], {}) == 2
    assert "unknown argument '--verify'" in capsys.readouterr().err
