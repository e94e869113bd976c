"""--verify finds damage that size and mtime hide; a normal run repairs exactly that."""

from __future__ import annotations

import json
import os

import pytest

from sample_tree import make_tree
from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("form,kind", [("local paths", "crc32"), ("rclone remotes", "md5")])
def test_verify_finds_damage_and_a_normal_run_repairs_only_it(env, form, kind):
    """A local DESTINATION is read back by the unzipper (CRC-32 of every file); through rclone
    it is listed with MD5s."""
    if form == "rclone remotes":
        env.via_rclone()
    make_tree(env.source, small_files=25)
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        assert env.run(script).returncode == 0
    clean = env.run("python_unzipper.py", "--verify")
    assert clean.returncode == 0, clean.stderr[-3000:]

    # Damage one file keeping its size and mtime; delete another; add an extra one.
    damaged = os.path.join(env.destination, "Photos", "img_013.jpg")
    st = os.stat(damaged)
    with open(damaged, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))
    os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(damaged).st_size == st.st_size
    os.remove(os.path.join(env.destination, "Unicode", "日本語のファイル.txt"))
    with open(os.path.join(env.destination, "Photos", "not in source.txt"), "w") as fh:
        fh.write("extra")
    before = {k: v for k, v in env.objects().items()}

    verify = env.run("python_unzipper.py", "--verify")
    assert verify.returncode == 3, verify.stderr[-3000:]
    out = verify.stdout
    assert f"differs  Photos/img_013.jpg  ({kind} " in out
    assert "missing  Unicode/日本語のファイル.txt" in out
    assert "extra    Photos/not in source.txt" in out
    assert len([line for line in out.splitlines() if line.startswith(("missing ", "differs "))]) == 2
    # --verify transfers nothing: no part was read back into DESTINATION.
    assert not os.path.exists(os.path.join(env.destination, "Unicode", "日本語のファイル.txt"))
    report = json.load(open(os.path.join(env.vars["WORK_DIR"], "reports", "latest.json")))
    assert report["mode"] == "verify" and report["totals"]["failed"] == 2

    repair = env.run("python_unzipper.py")
    assert repair.returncode == 0, repair.stderr[-3000:]
    restored_lines = [line for line in repair.stderr.splitlines() if "part restored" in line]
    assert len(restored_lines) == 2, restored_lines  # only the parts holding the two files
    assert all("part restored: 1 file," in line for line in restored_lines), restored_lines
    os.remove(os.path.join(env.destination, "Photos", "not in source.txt"))
    assert_same_tree(env.source, env.destination)
    after = env.objects()
    assert all(after.get(k) == v for k, v in before.items() if k.endswith(".zip")), "parts changed"
    assert env.run("python_unzipper.py", "--verify").returncode == 0
