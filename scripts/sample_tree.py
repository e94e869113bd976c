"""Make a SOURCE tree with the names and shapes that broke the original scripts.

Used by the demo (scripts/demo.sh) and by the end-to-end tests. The tree holds files
directly in SOURCE; names with spaces, a leading space, a leading '#' or ';', quotes, a
backslash, non-ASCII in NFC and NFD, CJK; files named like list files; zero-byte files;
empty directories (nested and top-level); folders whose key stems collide ('A B' / 'A_B',
'X' / 'X_unzip'); a folder whose stem is a prefix of another's ('Photos' / 'Photos 2020');
a folder ending in '.zip'; a folder name too long for a key stem; deep nesting; a folder that splits into parts by count and one
that splits by bytes; and files above the large-file threshold.

Every file gets an old, distinct modification time with a fractional part, so a test can
tell a kept mtime from "now".

Usage: python scripts/sample_tree.py DIR [--small N] [--large-bytes N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import unicodedata

BASE_MTIME = 1_000_000_000.25  # 2001-09-09, with a fractional second


def _write(path: str, data: bytes, mtime: float) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    os.utime(path, (mtime, mtime))


def make_tree(root: str, *, small_files: int = 25, by_bytes_files: int = 6, by_bytes_size: int = 200_000,
              large_bytes: int = 600_000, seed: int = 7) -> dict:
    """Create the tree under ``root``; return counts {files, bytes, dirs_empty}."""
    rng = random.Random(seed)
    n = [0]

    def put(rel: str, size: int) -> None:
        n[0] += 1
        _write(os.path.join(root, rel), rng.randbytes(size), BASE_MTIME + n[0] * 3600 + 0.5)

    nfd = unicodedata.normalize("NFD", "Café résumé")
    names = {
        "root file.txt": 1200,
        "#root-hash.txt": 10,
        "zero at root": 0,
        "A B/report 2024.txt": 3000,
        "A B/ leading space.txt": 40,
        "A B/#hash first.txt": 50,
        "A B/;semicolon first.txt": 60,
        "A B/quote's \"double\".txt": 70,
        "A B/back\\slash.txt": 80,
        "A B/filelist.txt": 90,
        "A B/sub/filelist.txt": 91,
        "A_B/other.txt": 500,
        "A_B/zero.bin": 0,
        "X/x.txt": 11,
        "X_unzip/y.txt": 12,
        "Photos 2020/beach.jpg": 4000,
        "Backup.zip/inner.txt": 123,
        "Backup.zip/Part1.zip": 77,
        "#drafts/plan.md": 321,
        "; notes/a.txt": 5,
        " lead folder/b.txt": 6,
        f"Unicode/{unicodedata.normalize('NFC', 'Café résumé')} nfc.txt": 101,
        f"Unicode/{nfd} nfd.txt": 102,
        "Unicode/日本語のファイル.txt": 103,
        "Unicode/中文目录/文件.txt": 104,
        "Unicode/emoji 🎉.txt": 105,
        "Deep/" + "/".join(f"level{i}" for i in range(12)) + "/bottom.txt": 106,
        "Deep/zero.txt": 0,
        # 80 CJK characters: 240 bytes on disk, a 720-character key stem, so the stem is shortened.
        "長" * 80 + "/long name.txt": 107,
    }
    for rel, size in names.items():
        put(rel, size)
    for i in range(small_files):
        put(f"Photos/img_{i:03d}.jpg", rng.randint(1, 2048))
    for i in range(by_bytes_files):
        put(f"Big/chunk_{i}.bin", by_bytes_size)
    put("Big/huge one.bin", large_bytes)
    put("top level large.bin", large_bytes)
    empty_dirs = ["Empty Top", "A B/empty inside", "Deep/empty/nested/twice", "Unicode/空"]
    for d in empty_dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _ds, fs in os.walk(root) for f in fs)
    files = sum(len(fs) for _dp, _ds, fs in os.walk(root))
    return {"files": files, "bytes": total, "empty_dirs": len(empty_dirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir")
    parser.add_argument("--small", type=int, default=25)
    parser.add_argument("--large-bytes", type=int, default=600_000)
    args = parser.parse_args()
    print(json.dumps(make_tree(args.dir, small_files=args.small, large_bytes=args.large_bytes)))


if __name__ == "__main__":
    main()
