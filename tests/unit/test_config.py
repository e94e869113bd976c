"""Config.from_env: required variables per script, parsing, cross-field rules, secrets;
and the rclone path helpers is_local_path / remote_join."""

from __future__ import annotations

import os

import pytest

from common_s3 import GIB, Config, ConfigError, is_local_path, remote_join

REQUIRED = {
    "mapper": {"SOURCE": "src:", "S3_BUCKET": "unit-bucket"},
    "zipper": {"SOURCE": "src:", "DESTINATION": "dst:", "S3_BUCKET": "unit-bucket"},
    "unzipper": {"DESTINATION": "dst:", "S3_BUCKET": "unit-bucket"},
}


@pytest.fixture
def base(tmp_path):
    return {"WORK_DIR": str(tmp_path)}


def from_env(env: dict, script: str = "zipper") -> Config:
    return Config.from_env(env, script)


def config_error(env: dict, script: str = "zipper") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Config.from_env(env, script)
    assert info.value.exit_code == 2
    return info.value


# Required variables

@pytest.mark.parametrize("script, missing", [(s, v) for s, req in REQUIRED.items() for v in req])
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_required_variable_is_named(base, script, missing, how):
    env = {**base, **REQUIRED[script]}
    if how == "absent":
        del env[missing]
    else:
        env[missing] = ""
    err = config_error(env, script)
    assert missing in str(err)


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_required_variables_are_enough(base, script):
    cfg = from_env({**base, **REQUIRED[script]}, script)
    assert cfg.script == script
    assert cfg.bucket == "unit-bucket"


def test_unzipper_needs_no_destination_with_skip_upload(base):
    cfg = from_env({**base, "S3_BUCKET": "unit-bucket", "SKIP_UPLOAD": "1"}, "unzipper")
    assert cfg.skip_upload is True
    assert cfg.destination is None
    assert cfg.local_output_dir == os.path.join(base["WORK_DIR"], "merged_output")


def test_mapper_and_unzipper_ignore_the_variables_they_do_not_use(base):
    assert from_env({**base, **REQUIRED["mapper"]}, "mapper").destination is None
    assert from_env({**base, **REQUIRED["unzipper"]}, "unzipper").source is None


def test_defaults(base):
    cfg = from_env({**base, **REQUIRED["zipper"]})
    assert cfg.prefix == "work_files_zips/"
    assert cfg.large_file_threshold_bytes == 20 * GIB
    assert cfg.max_zip_bytes == 20 * GIB
    assert cfg.split_threshold == 1000
    assert cfg.max_parallel_workers == 2
    assert (cfg.download_threads, cfg.upload_threads) == (6, 6)
    assert (cfg.disk_limit_percent, cfg.disk_backpressure_percent) == (80, 70)
    assert (cfg.s3_max_retries, cfg.max_retry_duration_s) == (3, 300)
    assert cfg.instance_lock_timeout_s == 0
    assert (cfg.log_level, cfg.log_format) == ("INFO", "text")
    assert (cfg.worker_count, cfg.worker_index) == (1, 0)
    assert cfg.force_rescan is cfg.dry_run is cfg.skip_upload is cfg.propagate_deletes is False
    assert cfg.work_dir == base["WORK_DIR"]
    assert cfg.tmp_dir == os.path.join(base["WORK_DIR"], ".tmp", "zipper")


# Unparsable or out-of-range values

@pytest.mark.parametrize("name, value", [
    ("MAX_ZIP_SIZE_GB", "abc"),
    ("MAX_ZIP_SIZE_GB", "nan"),
    ("MAX_ZIP_SIZE_GB", "inf"),
    ("MAX_ZIP_SIZE_GB", "0"),
    ("MAX_ZIP_SIZE_GB", "-1"),
    ("LARGE_FILE_THRESHOLD_GB", "-1"),
    ("LARGE_FILE_THRESHOLD_GB", "twenty"),
    ("SPLIT_THRESHOLD", "1.5"),
    ("SPLIT_THRESHOLD", "0"),
    ("SPLIT_THRESHOLD", "1e3"),
    ("MAX_PARALLEL_WORKERS", "0"),
    ("MAX_PARALLEL_WORKERS", "65"),
    ("MAX_PARALLEL_WORKERS", "nan"),
    ("DOWNLOAD_THREADS", "x"),
    ("UPLOAD_THREADS", "0"),
    ("DISK_LIMIT_PERCENT", "150"),
    ("DISK_LIMIT_PERCENT", "nan"),
    ("DISK_LIMIT_PERCENT", "0"),
    ("DISK_BACKPRESSURE_PERCENT", "101"),
    ("S3_MAX_RETRIES", "0"),
    ("S3_MAX_RETRIES", "51"),
    ("MAX_RETRY_DURATION", "0"),
    ("INSTANCE_LOCK_TIMEOUT", "-5"),
    ("INSTANCE_LOCK_TIMEOUT", "soon"),
    ("PROGRESS_INTERVAL", "0"),
    ("LEASE_SECONDS", "-inf"),
    ("COMMAND_TIMEOUT", "0"),
    ("MAX_ZIP_BOMB_RATIO", "0.5"),
    ("WORKER_COUNT", "0"),
    ("WORKER_COUNT", "two"),
    ("WORKER_INDEX", "-1"),
    ("WORKER_INDEX", "x"),
    ("S3_BUCKET", "ab"),
    ("S3_BUCKET", "-bucket-"),
    ("S3_BUCKET", "has space"),
    ("WORKER_ID", "a b"),
    ("WORKER_ID", "x" * 101),
    ("LOG_FORMAT", "xml"),
    ("LOG_LEVEL", "loud"),
    ("S3_CHECKSUMS", "sometimes"),
])
def test_bad_value_names_the_variable(base, name, value):
    err = config_error({**base, **REQUIRED["zipper"], name: value})
    assert name in str(err)


@pytest.mark.parametrize("value", ["abc", "nan", "1.5", "150"])
def test_message_shows_the_bad_value(base, value):
    name = "SPLIT_THRESHOLD" if value == "1.5" else "DISK_LIMIT_PERCENT"
    err = config_error({**base, **REQUIRED["zipper"], name: value})
    assert value in str(err)


def test_prefix_longer_than_200_bytes(base):
    err = config_error({**base, **REQUIRED["zipper"], "S3_PREFIX": "p" * 201})
    assert "S3_PREFIX" in str(err)


@pytest.mark.parametrize("name", ["FORCE_RESCAN", "PROPAGATE_DELETES", "SKIP_UPLOAD", "DRY_RUN"])
@pytest.mark.parametrize("value", ["maybe", "2", "enable", "y"])
def test_bad_boolean_names_the_variable(base, name, value):
    err = config_error({**base, **REQUIRED["zipper"], name: value})
    assert name in str(err)
    assert value in str(err)


@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("YES", True), (" on ", True), ("True", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
])
def test_booleans(base, value, expected):
    assert from_env({**base, **REQUIRED["zipper"], "FORCE_RESCAN": value}).force_rescan is expected


# Cross-field rules

def test_max_zip_size_below_large_file_threshold(base):
    err = config_error({**base, **REQUIRED["zipper"], "MAX_ZIP_SIZE_GB": "1",
                        "LARGE_FILE_THRESHOLD_GB": "2"})
    assert "MAX_ZIP_SIZE_GB" in str(err)
    assert "LARGE_FILE_THRESHOLD_GB" in str(err)


def test_max_zip_size_below_the_default_threshold(base):
    err = config_error({**base, **REQUIRED["zipper"], "MAX_ZIP_SIZE_GB": "5"})
    assert "MAX_ZIP_SIZE_GB" in str(err)


def test_backpressure_above_limit(base):
    err = config_error({**base, **REQUIRED["zipper"], "DISK_BACKPRESSURE_PERCENT": "90"})
    assert "DISK_BACKPRESSURE_PERCENT" in str(err)
    err = config_error({**base, **REQUIRED["zipper"], "DISK_LIMIT_PERCENT": "50",
                        "DISK_BACKPRESSURE_PERCENT": "60"})
    assert "DISK_BACKPRESSURE_PERCENT" in str(err)


def test_backpressure_equal_to_limit_is_fine(base):
    cfg = from_env({**base, **REQUIRED["zipper"], "DISK_LIMIT_PERCENT": "60",
                    "DISK_BACKPRESSURE_PERCENT": "60"})
    assert cfg.disk_limit_percent == cfg.disk_backpressure_percent == 60


@pytest.mark.parametrize("index, count", [("2", "2"), ("1", "1"), ("5", "3")])
def test_worker_index_must_be_below_worker_count(base, index, count):
    err = config_error({**base, **REQUIRED["zipper"], "WORKER_INDEX": index, "WORKER_COUNT": count})
    assert "WORKER_INDEX" in str(err)


@pytest.mark.parametrize("var", ["JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"])
def test_worker_index_defaults_from_the_job_engine(base, var):
    assert from_env({**base, **REQUIRED["zipper"], var: "0"}).worker_index == 0
    err = config_error({**base, **REQUIRED["zipper"], var: "1"})
    assert f"{var}=1" in str(err)


def test_several_workers_are_accepted_with_their_index(base):
    cfg = from_env({**base, **REQUIRED["zipper"], "WORKER_COUNT": "3", "JOB_COMPLETION_INDEX": "2",
                    "LEASE_SECONDS": "5"})
    assert (cfg.worker_count, cfg.worker_index, cfg.lease_seconds) == (3, 2, 5)


def test_explicit_worker_index_wins_over_job_engine(base):
    cfg = from_env({**base, **REQUIRED["zipper"], "WORKER_INDEX": "0", "JOB_COMPLETION_INDEX": "7"})
    assert cfg.worker_index == 0


def test_propagate_deletes_is_off_unless_asked(base):
    assert from_env({**base, **REQUIRED["zipper"]}).propagate_deletes is False
    assert from_env({**base, **REQUIRED["zipper"], "PROPAGATE_DELETES": "1"}).propagate_deletes is True


@pytest.mark.parametrize("name, value", [("DRY_RUN", "0"), ("PROPAGATE_DELETES", "off"),
                                         ("WORKER_COUNT", "1")])
def test_unsupported_features_switched_off_are_fine(base, name, value):
    from_env({**base, **REQUIRED["zipper"], name: value})


@pytest.mark.parametrize("var", ["JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"])
def test_bad_job_engine_index_is_named(base, var):
    err = config_error({**base, **REQUIRED["zipper"], var: "abc"})
    assert var in str(err)
    assert "WORKER_INDEX" not in str(err)


# Decimals, normalisation, secrets

@pytest.mark.parametrize("max_gb, large_gb", [("0.001", "0.001"), ("0.5", "0.25"), ("1", "0")])
def test_decimal_gigabytes(base, max_gb, large_gb):
    cfg = from_env({**base, **REQUIRED["zipper"], "MAX_ZIP_SIZE_GB": max_gb,
                    "LARGE_FILE_THRESHOLD_GB": large_gb})
    assert cfg.max_zip_bytes == int(float(max_gb) * GIB)
    assert cfg.large_file_threshold_bytes == int(float(large_gb) * GIB)
    assert isinstance(cfg.max_zip_bytes, int)


def test_thousandth_of_a_gigabyte_is_about_a_megabyte(base):
    cfg = from_env({**base, **REQUIRED["zipper"], "MAX_ZIP_SIZE_GB": "0.001",
                    "LARGE_FILE_THRESHOLD_GB": "0.0005"})
    assert cfg.max_zip_bytes == 1073741
    assert cfg.large_file_threshold_bytes == 536870


@pytest.mark.parametrize("given, expected", [
    ("remote:", "remote:"),
    ("remote:path/", "remote:path"),
    ("remote:/", "remote:"),
    ("remote:Work Files", "remote:Work Files"),
])
def test_remote_source_is_normalised(base, given, expected):
    assert from_env({**base, **REQUIRED["zipper"], "SOURCE": given}).source == expected


def test_local_source_becomes_absolute(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = from_env({**base, **REQUIRED["zipper"], "SOURCE": "rel/dir", "DESTINATION": "./out:x"})
    assert cfg.source == str(tmp_path / "rel" / "dir")
    assert cfg.destination == str(tmp_path / "out:x")


def test_secret_never_in_repr(base):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"
    env = {**base, **REQUIRED["zipper"], "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_SESSION_TOKEN": "token-" + secret}
    cfg = from_env(env)
    assert secret not in repr(cfg)
    assert secret not in str(cfg)
    assert cfg.environ["AWS_SECRET_ACCESS_KEY"] == secret  # rclone still gets it


def test_config_is_frozen(base):
    cfg = from_env({**base, **REQUIRED["zipper"]})
    with pytest.raises(AttributeError):
        cfg.bucket = "other"


def test_environ_is_copied(base):
    env = {**base, **REQUIRED["zipper"]}
    cfg = from_env(env)
    env["SOURCE"] = "changed:"
    assert cfg.environ["SOURCE"] == "src:"


# Paths

@pytest.mark.parametrize("path, local", [
    ("remote:", False),
    ("remote:path", False),
    ("remote:path/with/dirs", False),
    ("my remote:Work Files", False),
    ("remote:/abs", False),
    ("/abs", True),
    ("/abs/with:colon", True),
    ("rel/dir", True),
    ("rel", True),
    ("./x:y", True),
    ("../x:y", True),
    ("dir/x:y", True),
    ("", True),
])
def test_is_local_path(path, local):
    assert is_local_path(path) is local


@pytest.mark.parametrize("base, parts, expected", [
    ("remote:", ("F",), "remote:F"),
    ("remote:", ("F", "a b.txt"), "remote:F/a b.txt"),
    ("remote:path", ("F",), "remote:path/F"),
    ("remote:path/", ("F",), "remote:path/F"),
    ("/a", ("b c",), "/a/b c"),
    ("/", ("x",), "/x"),
    ("/a", ("", "b"), "/a/b"),
    ("/a", (), "/a"),
    ("remote:", ("#x", "日本/語"), "remote:#x/日本/語"),
])
def test_remote_join(base, parts, expected):
    assert remote_join(base, *parts) == expected
