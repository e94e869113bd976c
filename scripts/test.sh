#!/usr/bin/env bash
# Run the whole test suite: unit tests, then end-to-end tests that run the real scripts
# against real rclone and a real S3 server (moto) on 127.0.0.1. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" requirements-test.txt
cd "$here"
exec "$PY" -m pytest "$@"
