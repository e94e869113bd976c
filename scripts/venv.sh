# Sourced by demo.sh and test.sh: create or reuse .venv beside the repository and install
# the requirements file given as $1 (only when it changed since the last install).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MIGRATION_VENV:-$here/.venv}"
req="$here/$1"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment $venv" >&2
    python3 -m venv "$venv"
fi
stamp="$venv/.installed-$(basename "$req")"
digest="$(cat "$req" "$here/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "installing $(basename "$req") into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$digest" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
PY="$venv/bin/python"
