"""Fixtures for the unit tests: fake AWS credentials, moto in-process, a Config from a dict.

Nothing here starts a server or a subprocess; every S3 call goes to moto's in-process mock
or to a botocore Stubber.
"""

from __future__ import annotations

import logging

import boto3
import moto
import pytest
from botocore.exceptions import ClientError

import common_s3

BUCKET = "unit-bucket"


@pytest.fixture
def aws_credentials(monkeypatch):
    """Fake credentials and a region, so no test can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def boto_session():
    """One boto3 session for the whole run: it loads the S3 service model once (a new
    session per test costs ~0.1 s). Clients get explicit fake keys, never the session's."""
    return boto3.session.Session()


def new_client(session):
    return session.client("s3", region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")


@pytest.fixture
def s3(aws_credentials, boto_session):
    """A boto3 client inside moto's mock, with the bucket ``unit-bucket`` created."""
    with moto.mock_aws():
        client = new_client(boto_session)
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture
def stub_client(aws_credentials, boto_session):
    """A real botocore client for a Stubber; it never reaches the network."""
    return new_client(boto_session)


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(script="zipper", **env)`` -> Config built from a plain dict."""

    def make(script: str = "zipper", **env: str) -> common_s3.Config:
        base = {"SOURCE": "src:", "DESTINATION": "dst:", "S3_BUCKET": BUCKET,
                "WORK_DIR": str(tmp_path / "work"), "WORKER_ID": "unit-worker",
                "S3_MAX_RETRIES": "3"}
        base.update(env)
        return common_s3.Config.from_env(base, script)

    return make


class InstantStop:
    """Stands in for the run's stop event: waits return at once and are recorded."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False

    def is_set(self) -> bool:
        return False


@pytest.fixture
def instant_stop() -> InstantStop:
    return InstantStop()


@pytest.fixture
def records(s3, make_cfg, instant_stop) -> common_s3.Records:
    """Records on the moto bucket; retries never sleep."""
    return common_s3.Records(s3, make_cfg(), stop=instant_stop)


@pytest.fixture
def client_error():
    """``client_error(code, status, op)`` -> a botocore ClientError built by hand."""

    def make(code: str | None, status: int = 400, op: str = "GetObject") -> ClientError:
        error = {"Message": f"test {code}"}
        if code is not None:
            error["Code"] = code
        return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, op)

    return make


@pytest.fixture
def restore_logging():
    """Undo what ``setup_logging`` (called by ``main``) does to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
