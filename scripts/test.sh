#!/usr/bin/env bash
# Run the whole test suite: unit tests and end-to-end tests that run the real scripts
# against real rclone and a real S3 server (moto) on 127.0.0.1. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" requirements-test.txt
cd "$here"
# Two test processes by default (TEST_WORKERS=0 runs them in this one process, e.g. for pdb);
# worksteal, because the end-to-end tests take 1 to 100 s each.
workers="${TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
    exec "$PY" -m pytest "$@"
fi
exec "$PY" -m pytest -n "$workers" --dist worksteal "$@"
