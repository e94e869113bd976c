"""The mapper's time on cloud-like backends against a plain ``rclone lsjson -R`` of the same
tree, and the first-run exit codes of a whole migration from each backend to a local folder.

    python bench/backends.py [--files 1936] [--old PATH_TO_AN_OLDER_CHECKOUT]

Starts OpenSSH's sshd, wsgidav and pyftpdlib on 127.0.0.1 (as tests/backends.py does) and a
moto S3 server; prints one table. ``--old`` runs the mapper of another checkout on the same
tree too, to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "scripts")]

from backends import _start_ftp, _start_sftp, _start_webdav  # noqa: E402
from e2ekit import base_env, rclone_binary  # noqa: E402


def make_tree(root: str, files: int) -> int:
    rng = random.Random(5)
    total = 0
    for i in range(files):
        path = os.path.join(root, f"Folder {i % 8}", f"sub {i % 13}", f"file {i:05d}.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        size = rng.randint(1_000, 60_000)
        with open(path, "wb") as fh:
            fh.write(rng.randbytes(size))
        total += size
    return total


def timed(argv: list[str], env: dict, cwd: str) -> tuple[int, float]:
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    if proc.returncode not in (0,):
        sys.stderr.write(proc.stderr[-2000:])
    return proc.returncode, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1936)
    parser.add_argument("--old", help="another checkout whose master_mapper.py is timed too")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    base = tempfile.mkdtemp(prefix="bench-backends-")
    servers = []
    rows = []
    try:
        starters = {"sftp": lambda b: _start_sftp(b), "webdav": lambda b: _start_webdav(b),
                    "ftp (MFMT)": lambda b: _start_ftp(b, "ftptest", mfmt=True),
                    "ftp (no MFMT)": lambda b: _start_ftp(b, "ftpnomfmt", mfmt=False)}
        for label, start in starters.items():
            here = os.path.join(base, label.split()[0] + str(len(servers)))
            os.makedirs(here)
            backend, server = start(here)
            servers.append(server)
            nbytes = make_tree(backend.local_path("src"), args.files)
            tmp = os.path.join(here, "run")
            os.makedirs(tmp)
            import boto3
            bucket = f"b-{uuid.uuid4().hex[:10]}"
            env = {**base_env(tmp, endpoint, bucket), **backend.remote_env,
                   "SOURCE": backend.remote_path("src"), "DESTINATION": os.path.join(tmp, "destination"),
                   "LARGE_FILE_THRESHOLD_GB": "20", "MAX_ZIP_SIZE_GB": "20", "SPLIT_THRESHOLD": "1000"}
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
            _, plain = timed([rclone_binary(), "lsjson", "-R", "--no-mimetype", env["SOURCE"]], env, tmp)
            codes, times = [], {}
            for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
                code, seconds = timed([sys.executable, os.path.join(ROOT, script)], env, tmp)
                codes.append(code)
                times[script] = seconds
            old = None
            if args.old:
                env_old = {**env, "S3_PREFIX": "old/", "WORK_DIR": os.path.join(tmp, "work-old")}
                _, old = timed([sys.executable, os.path.join(args.old, "master_mapper.py")], env_old, tmp)
            rows.append((label, args.files, nbytes / 2**20, plain, times["master_mapper.py"], old,
                         "/".join(map(str, codes))))
    finally:
        for server in servers:
            server.stop()
        moto.stop()
    print(f"\n{'SOURCE':<16}{'files':>7}{'MiB':>8}{'lsjson -R s':>13}{'mapper s':>10}{'old mapper s':>14}"
          f"  first-run exit codes (mapper/zipper/unzipper, DESTINATION local)")
    for label, n, mib, plain, mapper, old, codes in rows:
        print(f"{label:<16}{n:>7}{mib:>8.1f}{plain:>13.1f}{mapper:>10.1f}"
              f"{(f'{old:.1f}' if old is not None else '-'):>14}  {codes}")


if __name__ == "__main__":
    main()
