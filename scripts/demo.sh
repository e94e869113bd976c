#!/usr/bin/env bash
# The whole pipeline on a local demo: a sample SOURCE tree with awkward names, a local S3
# server (rclone serve s3 on 127.0.0.1), then migrate.py (mapper, zipper and unzipper together), and
# a byte-for-byte comparison of DESTINATION with SOURCE. Everything lives in ./demo_work.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" requirements.txt
cd "$here"
demo="$here/demo_work"
rm -rf "$demo"
mkdir -p "$demo/s3/demo-bucket" "$demo/work"
echo "== making the sample SOURCE tree in $demo/source"
"$PY" scripts/sample_tree.py "$demo/source"

port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
key="demo-$RANDOM$RANDOM"
secret="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
echo "== starting a local S3 server (rclone serve s3) on 127.0.0.1:$port"
RCLONE_AUTH_KEY="\"$key,$secret\"" rclone serve s3 --addr "127.0.0.1:$port" --config /dev/null \
    "$demo/s3" > "$demo/s3-server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
    sleep 0.2
done

export AWS_ACCESS_KEY_ID="$key" AWS_SECRET_ACCESS_KEY="$secret" AWS_REGION=us-east-1
export S3_ENDPOINT="http://127.0.0.1:$port" S3_BUCKET=demo-bucket S3_PREFIX=demo/
export SOURCE="$demo/source" DESTINATION="$demo/destination" WORK_DIR="$demo/work"
export RCLONE_CONFIG=/dev/null
# Tiny thresholds, so the small demo tree shows parts split by count and by bytes and
# files that go SOURCE -> DESTINATION directly.
export SPLIT_THRESHOLD=10 LARGE_FILE_THRESHOLD_GB=0.0005 MAX_ZIP_SIZE_GB=0.001

echo "== python migrate.py (the three stages together)"
start=$EPOCHREALTIME
"$PY" migrate.py
echo "== migrate.py finished in $("$PY" -c "print(f'{$EPOCHREALTIME - $start:.1f}')") s"
echo "== objects in the bucket: $(find "$demo/s3/demo-bucket" -type f | wc -l)"
"$PY" - "$demo/source" "$demo/destination" <<'PYEOF'
import os, sys
def walk(root):
    out = {}
    for d, ds, fs in os.walk(root):
        for n in fs:
            p = os.path.join(d, n)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, int(st.st_mtime), open(p, "rb").read())
        if not ds and not fs:
            out[os.path.relpath(d, root) + "/"] = "empty dir"
    return out
src, dst = walk(sys.argv[1]), walk(sys.argv[2])
bad = sorted(k for k in set(src) | set(dst) if src.get(k) != dst.get(k))
print(f"== DESTINATION vs SOURCE: {len(src)} files and empty directories compared, {len(bad)} differ")
for k in bad[:20]:
    print("   differs:", repr(k))
sys.exit(1 if bad else 0)
PYEOF
