"""What hashing costs per byte on this machine: each hash the scripts use, and the hashes the
zipper and the unzipper compute for every byte of a large file: before issue 19 item 6, now,
and the variant measured and not taken (docs/DESIGN.md, Zipper). Standard library only; from memory, no disk, no network.

    python bench/hashes.py [--mib 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import zlib

MIB = 1 << 20
CHUNK = 16 * MIB  # the zipper's chunk (MIN_CHUNK)


def md5(data: memoryview) -> None:
    hashlib.md5(data).digest()


def sha256(data: memoryview) -> None:
    hashlib.sha256(data).digest()


def crc32(data: memoryview) -> None:
    zlib.crc32(data)


def chunk_md5s(data: memoryview) -> None:
    for i in range(0, len(data), CHUNK):
        hashlib.md5(data[i:i + CHUNK]).digest()


# The hashes of one byte of a file over IN_MEMORY_MAX (read twice: CRC-32 first), per variant.
VARIANTS = [
    ("zipper, before", [crc32, crc32, md5, chunk_md5s, sha256, sha256]),  # + object's, botocore's SHA-256
    ("zipper, now", [crc32, crc32, md5, chunk_md5s, sha256]),  # no payload SHA-256
    ("zipper, without the SHA-256", [crc32, crc32, md5, chunk_md5s]),  # records of chunk MD5s: not taken
    ("unzipper, now", [sha256, crc32]),
    ("unzipper, chunk MD5s", [chunk_md5s, crc32]),  # what records of chunk MD5s would cost it
]


def best_seconds(variants: list[tuple[str, list]], data: memoryview, rounds: int) -> dict[str, float]:
    """Best time of each variant, the variants taken in turn in every round (the machine is noisy)."""
    best = {name: float("inf") for name, _ in variants}
    for _ in range(rounds):
        for name, fns in variants:
            t = time.perf_counter()
            for fn in fns:
                fn(data)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB hashed per measurement [64]")
    ap.add_argument("--rounds", type=int, default=5, help="measurements, the best is kept [5]")
    args = ap.parse_args()
    data = memoryview(os.urandom(args.mib * MIB))
    print(f"{args.mib} MiB from memory, best of {args.rounds}")
    singles = best_seconds([(name, [fn]) for name, fn in [("md5", md5), ("sha256", sha256), ("crc32", crc32)]],
                           data, args.rounds)
    for name, s in singles.items():
        print(f"  {name:30} {args.mib / s:7.0f} MiB/s  {s / args.mib * 1000:6.3f} ms/MiB")
    for name, s in best_seconds(VARIANTS, data, args.rounds).items():
        print(f"  {name:30} {s / args.mib * 1000:6.3f} ms/MiB of CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
