"""The servers of tests/backends.py answer real rclone: a small folder (a file, a zero-byte file,
a file in a subfolder) goes to each and comes back byte for byte, and ``rclone backend features``
works (its hashes, mtime precision and SlowHash are printed, not asserted: run with -s)."""

from __future__ import annotations

import ftplib
import hashlib
import io
import json
import os
import subprocess
import uuid

import pytest

from e2ekit import rclone_binary

pytestmark = pytest.mark.e2e

BACKENDS = ["sftp_server", "webdav_server", "ftp_server", "ftp_server_nomfmt"]
FILES = {"hello.txt": b"hello, backend\n" * 100, "empty.bin": b"", "sub/dir/deep.dat": bytes(range(256)) * 40}
MTIME_NS = 1614834367_123456789   # 2021-03-04 05:06:07.123456789 UTC: sub-second, far from now


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.getfixturevalue(request.param)


def rclone(backend, tmp_path, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "rclone.conf"
    config.touch()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)),
           "RCLONE_CONFIG": str(config), **backend.remote_env}
    proc = subprocess.run([rclone_binary(), "--retries", "1", "--low-level-retries", "2", *args],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (f"rclone {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}\n"
                                  f"--- {backend.name} server log ---\n{backend.server_log()[-3000:]}")
    return proc


def write_tree(folder) -> None:
    for rel, data in FILES.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))


def read_tree(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder).replace(os.sep, "/")] = f.read()
    return out


def test_folder_goes_to_the_backend_and_back_byte_for_byte(backend, tmp_path):
    case = f"smoke-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "src"
    write_tree(src)
    rclone(backend, tmp_path, "copy", str(src), backend.remote_path(case))
    assert read_tree(backend.local_path(case)) == FILES   # on the server's disk
    back = tmp_path / "back"
    rclone(backend, tmp_path, "copy", backend.remote_path(case), str(back))
    assert read_tree(str(back)) == FILES

    # What became of the mtimes (printed only): on the server's disk, and as rclone lists them
    on_disk = os.stat(os.path.join(backend.local_path(case), "hello.txt")).st_mtime_ns
    listed = json.loads(rclone(backend, tmp_path, "lsjson", "-R", "--files-only",
                               backend.remote_path(case)).stdout)
    listed = {e["Path"]: e["ModTime"] for e in listed}
    print(f"\n[{backend.name}] started in {backend.startup_seconds:.2f} s; source mtime {MTIME_NS} ns; "
          f"on the server's disk {on_disk} ns (kept: {on_disk == MTIME_NS}, "
          f"to the second: {on_disk // 10**9 == MTIME_NS // 10**9}); listed by rclone: {listed['hello.txt']}")


def test_backend_features_command_works(backend, tmp_path):
    proc = rclone(backend, tmp_path, "backend", "features", f"{backend.name}:")
    info = json.loads(proc.stdout)
    features = info.get("Features", {})
    precision = info.get("Precision")
    print(f"\n[{backend.name}] Hashes={info.get('Hashes')} Precision={precision} ns "
          f"({precision / 1e9 if precision is not None else None} s) SlowHash={features.get('SlowHash')} "
          f"SlowModTime={features.get('SlowModTime')} "
          f"true features: {sorted(k for k, v in features.items() if v is True)}")


def test_sftp_hashes_come_from_the_remote_shell(sftp_server, tmp_path):
    """rclone's sftp md5/sha1 run md5sum/sha1sum over ssh: the fixture's shell session works."""
    case = f"hash-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "src"
    write_tree(folder)
    rclone(sftp_server, tmp_path, "copy", str(folder), sftp_server.remote_path(case))
    for algo in ("md5", "sha1"):
        out = rclone(sftp_server, tmp_path, "hashsum", algo, sftp_server.remote_path(case)).stdout
        got = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in out.splitlines() if line.strip()}
        assert got == {rel: hashlib.new(algo, data).hexdigest() for rel, data in FILES.items()}


@pytest.mark.parametrize("fixture,offered", [("ftp_server", True), ("ftp_server_nomfmt", False)])
def test_ftp_servers_offer_mfmt_or_not(request, fixture, offered):
    backend = request.getfixturevalue(fixture)
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", backend.port, timeout=10)
    try:
        ftp.login(backend.extra["user"], backend.extra["password"])
        feats = [line.strip().split(" ")[0] for line in ftp.sendcmd("FEAT").splitlines()[1:-1]]
        assert ("MFMT" in feats) is offered, feats
        assert "MDTM" in feats and "MLST" in feats
        ftp.storbinary("STOR mfmt-probe.txt", io.BytesIO(b"x"))
        if offered:
            assert ftp.sendcmd("MFMT 20210304050607 mfmt-probe.txt").startswith("213")
        else:
            with pytest.raises(ftplib.error_perm, match="^500"):
                ftp.sendcmd("MFMT 20210304050607 mfmt-probe.txt")
        ftp.delete("mfmt-probe.txt")
    finally:
        ftp.close()
