"""Compare a DESTINATION tree with its SOURCE: bytes, mtimes within 1 s, empty directories."""

from __future__ import annotations

import hashlib
import os


def snapshot(root: str) -> dict[str, tuple]:
    """{relative path: ("file", size, mtime, sha256) or ("emptydir",)}; names kept as the disk has them."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(path, root)] = ("file", st.st_size, st.st_mtime, digest)
        if not dirs and not files and dirpath != root:
            out[os.path.relpath(dirpath, root) + "/"] = ("emptydir",)
    return out


def differences(source: str, destination: str, *, ignore: set[str] = frozenset()) -> list[str]:
    """Human-readable differences; empty when DESTINATION equals SOURCE."""
    src, dst = snapshot(source), snapshot(destination)
    problems = []
    for path in sorted(set(src) | set(dst)):
        if path in ignore:
            continue
        a, b = src.get(path), dst.get(path)
        if a is None:
            problems.append(f"extra at DESTINATION: {path!r}")
        elif b is None:
            problems.append(f"missing at DESTINATION: {path!r}")
        elif a[0] != b[0]:
            problems.append(f"kind differs: {path!r}")
        elif a[0] == "file":
            if a[1] != b[1] or a[3] != b[3]:
                problems.append(f"content differs: {path!r}")
            elif abs(a[2] - b[2]) > 1.0:
                problems.append(f"mtime differs by {b[2] - a[2]:.3f}s: {path!r}")
    return problems


def assert_same_tree(source: str, destination: str) -> None:
    problems = differences(source, destination)
    assert not problems, "\n".join(problems[:40])
