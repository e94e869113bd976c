"""main(argv, environ) of each script, called in-process: --help, usage and configuration
errors, and run_script's single mapping from outcomes to exit codes (with moto)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from botocore.exceptions import ClientError

import common_s3
import master_mapper
import python_unzipper
import python_zipper
from common_s3 import (ConfigError, DiskSpaceError, InstanceLock, Interrupted, MigrationError,
                       RecordError, S3AuthError, S3Error, S3NotFoundError, StopRequested)

SCRIPTS = {"mapper": master_mapper, "zipper": python_zipper, "unzipper": python_unzipper}
EXIT_CODES = ["0", "1", "2", "3", "4", "75", "130", "143"]


@pytest.fixture(autouse=True)
def _logging(restore_logging):
    """main() configures the root logger; put it back after each test."""


@pytest.fixture
def full_env(tmp_path):
    return {"SOURCE": str(tmp_path / "source"), "DESTINATION": str(tmp_path / "destination"),
            "S3_BUCKET": "unit-bucket", "WORK_DIR": str(tmp_path / "work"),
            "AWS_DEFAULT_REGION": "us-east-1", "WORKER_ID": "unit-worker", "S3_MAX_RETRIES": "1"}


# --help, usage, configuration

@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(capsys, script, flag):
    assert SCRIPTS[script].main(argv=[flag], environ={}) == 0
    out, err = capsys.readouterr()
    assert "Environment variables" in out
    for name in ("S3_BUCKET", "S3_PREFIX", "S3_ENDPOINT", "WORK_DIR", "INSTANCE_LOCK_TIMEOUT",
                 "LOG_LEVEL"):
        assert name in out
    assert "Exit codes:" in out
    codes = out[out.index("Exit codes:"):]
    for code in EXIT_CODES:
        assert f"\n  {code} " in codes
    assert err == ""


@pytest.mark.parametrize("script, variables", [
    ("mapper", ["SOURCE", "LARGE_FILE_THRESHOLD_GB", "SPLIT_THRESHOLD", "MAX_ZIP_SIZE_GB", "FORCE_RESCAN"]),
    ("zipper", ["SOURCE", "DESTINATION", "DOWNLOAD_THREADS", "S3_CHECKSUMS", "DISK_LIMIT_PERCENT"]),
    ("unzipper", ["DESTINATION", "SKIP_UPLOAD", "LOCAL_OUTPUT_DIR", "MAX_ZIP_BOMB_RATIO", "UPLOAD_THREADS",
                  "PROPAGATE_DELETES"]),
])
def test_help_lists_the_scripts_own_variables(capsys, script, variables):
    SCRIPTS[script].main(argv=["--help"], environ={})
    out = capsys.readouterr().out
    for name in variables:
        assert name in out


def test_help_wins_over_a_broken_configuration(capsys):
    assert python_zipper.main(argv=["--help"], environ={"MAX_ZIP_SIZE_GB": "abc"}) == 0


@pytest.mark.parametrize("script, first_missing", [("mapper", "SOURCE"), ("zipper", "SOURCE"),
                                                   ("unzipper", "DESTINATION")])
def test_empty_environment_is_a_usage_error(capsys, script, first_missing):
    assert SCRIPTS[script].main(argv=[], environ={}) == 2
    err = capsys.readouterr().err
    assert f"{first_missing} is required" in err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_missing_bucket_variable_is_a_usage_error(capsys, full_env, script):
    del full_env["S3_BUCKET"]
    assert SCRIPTS[script].main(argv=[], environ=full_env) == 2
    assert "S3_BUCKET is required" in capsys.readouterr().err
    assert not os.path.exists(full_env["WORK_DIR"]), "nothing may be touched"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("argv", [["--bogus"], ["extra"], ["--help-me"], ["-v"]])
def test_unknown_argument_is_a_usage_error(capsys, full_env, script, argv):
    assert SCRIPTS[script].main(argv=argv, environ=full_env) == 2
    err = capsys.readouterr().err
    assert "unknown argument" in err and argv[0] in err


@pytest.mark.parametrize("name, value", [("MAX_ZIP_SIZE_GB", "abc"), ("SPLIT_THRESHOLD", "1.5"),
                                         ("DISK_LIMIT_PERCENT", "150"), ("LOG_FORMAT", "xml")])
def test_bad_value_is_a_usage_error_naming_it(capsys, full_env, name, value):
    full_env[name] = value
    assert python_zipper.main(argv=[], environ=full_env) == 2
    assert name in capsys.readouterr().err


def test_configuration_error_respects_json_logs(capsys, full_env):
    full_env.update(LOG_FORMAT="json", SPLIT_THRESHOLD="x")
    assert python_zipper.main(argv=[], environ=full_env) == 2
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and all(line["level"] == "ERROR" for line in lines)
    assert any("SPLIT_THRESHOLD" in line["message"] for line in lines)


def test_secret_is_not_logged_on_configuration_error(capsys, full_env):
    secret = "wJalrXUtnFEMI-SECRET-VALUE"
    full_env.update(AWS_SECRET_ACCESS_KEY=secret, MAX_PARALLEL_WORKERS="0")
    assert python_zipper.main(argv=[], environ=full_env) == 2
    out, err = capsys.readouterr()
    assert secret not in out + err


# With S3 (moto): the steps before the script's own work

@pytest.fixture
def moto_env(s3, full_env):
    return full_env


def test_missing_bucket_exits_1(capsys, moto_env):
    moto_env["S3_BUCKET"] = "no-such-bucket"
    assert python_zipper.main(argv=[], environ=moto_env) == 1
    assert "no-such-bucket" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["zipper", "unzipper"])
def test_no_map_yet_means_waiting(capsys, moto_env, script):
    assert SCRIPTS[script].main(argv=[], environ={**moto_env, "UPSTREAM_WAIT": "0"}) == 4
    assert "master_mapper.py" in capsys.readouterr().err
    with InstanceLock(moto_env["WORK_DIR"], script):
        pass  # released
    assert not os.path.exists(os.path.join(moto_env["WORK_DIR"], ".tmp", script))


@pytest.mark.parametrize("script", ["zipper", "unzipper"])
def test_with_no_stage_before_it_running_a_stage_waits_only_upstream_wait(capsys, moto_env, script):
    """Started before the stage it follows (stages may be started in any order), it waits for
    that stage at most UPSTREAM_WAIT, says so, then ends as it would alone: exit 4."""
    assert SCRIPTS[script].main(argv=[], environ={**moto_env, "UPSTREAM_WAIT": "1"}) == 4
    err = capsys.readouterr().err
    before = "master_mapper.py" if script == "zipper" else "python_zipper.py"
    assert f"{before} is not running yet; waiting for it up to UPSTREAM_WAIT=1s" in err
    assert "master_mapper.py first" in err or "run master_mapper.py" in err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_second_instance_exits_75_and_leaves_the_holders_files(capsys, moto_env, script):
    tmp = os.path.join(moto_env["WORK_DIR"], ".tmp", SCRIPTS[script].SCRIPT)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "in-flight"), "w") as fh:
        fh.write("the holder's staging")
    with InstanceLock(moto_env["WORK_DIR"], script):
        assert SCRIPTS[script].main(argv=[], environ=moto_env) == 75
        assert os.path.exists(os.path.join(tmp, "in-flight"))
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err


# run_script: every outcome of a script's body maps to one exit code

@pytest.fixture
def body_env(moto_env, monkeypatch, boto_session):
    """moto_env, with run_script's client taken from the shared boto3 session: the real
    make_s3_client builds a new session, which loads the S3 model again (~0.25 s a test).
    The tests above keep the real factory."""
    monkeypatch.setattr(common_s3, "make_s3_client", lambda cfg: boto_session.client(
        "s3", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"))
    return moto_env


def run_body(env, body, *, options=()):
    return common_s3.run_script("zipper", "doc", body, [], env, options=options)


def raising(exc):
    def body(ctx):
        cfg, records, layout, rclone, runtime, argv = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime, ctx.argv
        raise exc
    return body


def s3_error(cls, key, code="InternalError"):
    return cls("GetObject", "unit-bucket", key,
               ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject"))


@pytest.mark.parametrize("outcome, code", [
    (0, 0),
    (3, 3),
    (4, 4),
    (Interrupted(signal.SIGTERM), 143),
    (Interrupted(signal.SIGINT), 130),
    (StopRequested("stopping"), 143),
    (RecordError("k", "bad"), 3),
    (DiskSpaceError("part", 10, 5, 80), 3),
    (MigrationError("fatal"), 1),
    (ConfigError("X=1 is bad"), 2),
    (ValueError("unexpected"), 1),
    ("auth", 1),
    ("bucket", 1),
    ("s3-key", 3),
    ("s3-bucket", 1),
])
def test_outcome_to_exit_code(capsys, body_env, outcome, code):
    if isinstance(outcome, int):
        body = lambda *args: outcome  # noqa: E731
    elif isinstance(outcome, str):
        body = raising({"auth": s3_error(S3AuthError, "k", "AccessDenied"),
                        "bucket": s3_error(S3NotFoundError, None, "NoSuchBucket"),
                        "s3-key": s3_error(S3Error, "k"),
                        "s3-bucket": s3_error(S3Error, None)}[outcome])
    else:
        body = raising(outcome)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert run_body(body_env, body) == code
    assert {s: signal.getsignal(s) for s in before} == before
    with InstanceLock(body_env["WORK_DIR"], "zipper"):
        pass
    assert not os.path.exists(os.path.join(body_env["WORK_DIR"], ".tmp", "zipper"))


def test_unexpected_error_is_logged_with_its_traceback(capsys, body_env):
    assert run_body(body_env, raising(ValueError("very unexpected"))) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "very unexpected" in err


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_request_during_the_body_wins_over_its_result(body_env, signum, code):
    def body(ctx):
        cfg, records, layout, rclone, runtime, argv = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime, ctx.argv
        runtime.request_stop(signum)
        return 0
    assert run_body(body_env, body) == code


def test_a_real_signal_becomes_a_stop_request(body_env):
    seen = {}

    def body(ctx):
        cfg, records, layout, rclone, runtime, argv = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime, ctx.argv
        os.kill(os.getpid(), signal.SIGTERM)
        seen["stop"] = runtime.stop.is_set()
        return 0
    assert run_body(body_env, body) == 143
    assert seen["stop"] is True


def test_body_gets_working_collaborators(body_env, s3):
    seen = {}

    def body(ctx):
        cfg, records, layout, rclone, runtime, argv = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime, ctx.argv
        records.put_json(layout.report("r1"), {"ok": True})
        seen.update(cfg=cfg, layout=layout, rclone=rclone, tmp=os.path.isdir(cfg.tmp_dir))
        return 0
    assert run_body(body_env, body) == 0
    assert seen["cfg"].bucket == "unit-bucket"
    assert seen["layout"].prefix == "work_files_zips/"
    assert seen["rclone"] is not None
    assert seen["tmp"] is True
    body_json = s3.get_object(Bucket="unit-bucket", Key="work_files_zips/_reports/r1.json")["Body"].read()
    assert json.loads(body_json) == {"ok": True}


def test_read_only_option_takes_no_lock(body_env, capsys):
    calls = []

    def body(ctx):
        cfg, records, layout, rclone, runtime, argv = ctx.cfg, ctx.records, ctx.layout, ctx.rclone, ctx.runtime, ctx.argv
        calls.append(argv)
        return 3
    with InstanceLock(body_env["WORK_DIR"], "zipper"):
        env = {k: v for k, v in body_env.items() if k not in ("SOURCE", "DESTINATION")}
        code = common_s3.run_script("zipper", "doc", body, ["--status"], env, options=["--status"])
    assert code == 0
    assert calls == [], "--status must not run the stage"
    assert "no complete map" in capsys.readouterr().out