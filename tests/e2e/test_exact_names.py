"""Names kept byte for byte through rclone: NFC and NFD spellings of one name side by side
(common in folders synced from macOS), read and written through rclone remotes."""

from __future__ import annotations

import os
import unicodedata

import pytest

from treecheck import assert_same_tree

pytestmark = pytest.mark.e2e

NFC = unicodedata.normalize("NFC", "résumé.txt")
NFD = unicodedata.normalize("NFD", "résumé.txt")


def _write(path: str, body: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(body)


def test_nfc_and_nfd_siblings_arrive_both_on_the_first_run(env):
    env.via_rclone()
    for folder in ("Docs", ""):
        _write(os.path.join(env.source, folder, NFC), b"composed " * 10)
        _write(os.path.join(env.source, folder, NFD), b"decomposed " * 10)
    _write(os.path.join(env.source, "Docs", "other.txt"), b"x")
    for script in ("master_mapper.py", "python_zipper.py", "python_unzipper.py"):
        proc = env.run(script)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"
    assert sorted(os.listdir(os.path.join(env.destination, "Docs"))) == sorted([NFC, NFD, "other.txt"])
    assert_same_tree(env.source, env.destination)
