"""delta.py: a delta pass after 1% of the small files changed, beside ``rclone copy`` (issue 10).

    bash bench/run.sh --delta              (through bench/run.sh, which prepares .venv)
    python bench/delta.py [--small N] [--folders N] [--changed-percent P]

It makes bench.py's small-file set, migrates it once (mapper, zipper, unzipper through
``rclone serve s3`` behind the counting proxy) and copies it once with ``rclone copy`` to a second
DESTINATION. Then it changes P% of the files (half keep their size with new bytes, half grow; all
get a new mtime) and measures, on the same change:

- the delta pass: ``FORCE_RESCAN=1`` mapper, zipper, unzipper: wall time per stage, S3 requests,
  bytes sent to S3 (request bodies) and the bytes of the new parts;
- ``rclone copy SOURCE DESTINATION`` (it compares every file): wall time and bytes it copied;
- a pass with nothing changed: its S3 requests and bytes.

Both DESTINATIONs are compared with SOURCE at the end. Figures are from this machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the generator, the servers, the proxy and the tree check)


def change_files(source: str, percent: float, seed: int) -> tuple[list[str], int]:
    """Change ``percent`` of the files under ``source``; returns (paths, their new total bytes)."""
    files = sorted(os.path.relpath(os.path.join(d, f), source) for d, _s, fs in os.walk(source) for f in fs)
    rng = random.Random(seed)
    picked = rng.sample(files, max(1, round(len(files) * percent / 100)))
    now = time.time()
    total = 0
    for i, rel in enumerate(sorted(picked)):
        path = os.path.join(source, rel)
        with open(path, "rb") as fh:
            data = fh.read()
        data = bytes(b ^ 0x5A for b in data) if i % 2 == 0 else data + os.urandom(1024)  # same size / grown
        with open(path, "wb") as fh:
            fh.write(data)
        os.utime(path, (now, now))
        total += len(data)
    return sorted(picked), total


def run(label: str, argv: list[str], env: dict, logs: str) -> tuple[float, int, str]:
    log_path = os.path.join(logs, f"{label}.log")
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        rc = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        bench.log(f"{label}: exit code {rc}; see {log_path}")
    return wall, rc, log_path


def pipeline(label: str, env: dict, proxy, logs: str, *, rescan: bool) -> dict:
    row: dict = {"label": label, "stages": {}}
    before = proxy.stats()
    for stage, script in bench.SCRIPTS:
        extra = {"FORCE_RESCAN": "1"} if rescan and stage == "mapper" else {}
        s0 = proxy.stats()
        wall, rc, _log = run(f"{label}-{stage}", [sys.executable, os.path.join(bench.REPO, script)],
                             {**env, **extra}, logs)
        diff = bench.stats_diff(s0, proxy.stats())
        row["stages"][stage] = {"wall_s": wall, "rc": rc, "requests": diff["total"], "bytes_in": diff["bytes_in"]}
    total = bench.stats_diff(before, proxy.stats())
    row.update(wall_s=sum(s["wall_s"] for s in row["stages"].values()), requests=total["total"],
               bytes_in=total["bytes_in"], by_method=total["by_method"],
               ok=all(s["rc"] == 0 for s in row["stages"].values()))
    return row


def rclone_copy(label: str, rclone: str, source: str, dest: str, env: dict, logs: str, sizes: dict) -> dict:
    wall, rc, log_path = run(label, [rclone, "copy", "-v", "--stats", "0", "--config", os.devnull, "--",
                                     source, dest], env, logs)
    copied = []
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = re.search(r"INFO\s+:\s+(.*): Copied \(", line)
            if m:
                copied.append(m.group(1))
    return {"label": label, "wall_s": wall, "rc": rc, "files_copied": len(copied),
            "bytes_copied": sum(sizes.get(p, 0) for p in copied)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=20000, help="small files (1-64 KiB) [20000]")
    ap.add_argument("--folders", type=int, default=300, help="folders [300]")
    ap.add_argument("--changed-percent", type=float, default=1.0, help="files changed between passes [1]")
    ap.add_argument("--out", default=os.path.join(bench.REPO, "bench_out", "delta.json"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-delta-")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    rclone = shutil.which("rclone") or os.path.join(os.path.dirname(sys.executable), "rclone")
    source = os.path.join(work, "source")
    info = bench.generate_set("small", source, argparse.Namespace(seed=args.seed, small=args.small,
                                                                  folders=args.folders, large=0, large_mib=1))
    bench.log(f"small set: {info['files']} files, {info['bytes'] / bench.MIB:.1f} MiB")
    dest, dest_rclone = os.path.join(work, "dest"), os.path.join(work, "dest-rclone")
    results: dict = {"set": info, "cpus": os.cpu_count()}
    try:
        hub = bench.S3Server("hub", os.path.join(work, "hub"), rclone, logs, buckets=("hub",))
        proxy = bench.Proxy("hub", hub.url, logs)
        env = {**bench.clean_env(), "PATH": os.path.dirname(rclone) + os.pathsep + os.environ["PATH"],
               "SOURCE": source, "DESTINATION": dest, "S3_BUCKET": "hub", "S3_ENDPOINT": proxy.url,
               "AWS_ACCESS_KEY_ID": hub.key, "AWS_SECRET_ACCESS_KEY": hub.secret, "AWS_REGION": "us-east-1",
               "RCLONE_CONFIG": os.devnull, "WORK_DIR": os.path.join(work, "work"), "PROGRESS_INTERVAL": "600"}
        results["first"] = pipeline("first", env, proxy, logs, rescan=False)
        results["rclone_first"] = rclone_copy("rclone-first", rclone, source, dest_rclone, bench.clean_env(), logs, {})
        bench.log(f"first pass {results['first']['wall_s']:.1f}s; rclone copy {results['rclone_first']['wall_s']:.1f}s")
        changed, changed_bytes = change_files(source, args.changed_percent, args.seed)
        sizes = {p: os.path.getsize(os.path.join(source, p)) for p in changed}
        results["changed"] = {"files": len(changed), "bytes": changed_bytes}
        results["delta"] = pipeline("delta", env, proxy, logs, rescan=True)
        results["rclone_delta"] = rclone_copy("rclone-delta", rclone, source, dest_rclone, bench.clean_env(), logs, sizes)
        results["unchanged"] = pipeline("unchanged", env, proxy, logs, rescan=True)
        client = hub.boto3()
        index = max((o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="hub")
                     for o in page.get("Contents", []) if o["Key"].endswith("/index.json")), default=None)
        gens = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="hub"):
            for o in page.get("Contents", []):
                m = re.search(r"_map/g(\d+)/index\.json$", o["Key"])
                if m:
                    gens[int(m.group(1))] = json.loads(client.get_object(Bucket="hub", Key=o["Key"])["Body"].read())
        for label, g in (("first", 1), ("delta", 2), ("unchanged", 3)):
            folders = gens.get(g, {}).get("folders", [])
            results[label]["new_parts"] = sum(len(f.get("parts") or []) for f in folders)
            results[label]["new_part_bytes"] = sum(p["bytes"] for f in folders for p in f.get("parts") or [])
            results[label]["changes"] = gens.get(g, {}).get("changes")
        snap = bench.snapshot(source)
        results["tree"] = bench.check_tree(snap, dest)["summary"]
        results["tree_rclone"] = bench.check_tree(snap, dest_rclone)["summary"]
        assert index
        proxy.stop()
        hub.stop()
    finally:
        bench.REG.cleanup()
    c, d, r, u = results["changed"], results["delta"], results["rclone_delta"], results["unchanged"]
    mib = bench.MIB
    print(f"\n== {info['files']} files, {info['bytes'] / mib:.1f} MiB in {args.folders} folders; "
          f"{c['files']} files changed ({args.changed_percent:g}%, {c['bytes'] / mib:.2f} MiB); {os.cpu_count()} CPUs")
    print(f"{'run':<34}{'wall s':>8}{'bytes sent':>14}{'S3 requests':>13}  notes")
    first = results["first"]
    print(f"{'first pass (pipeline)':<34}{first['wall_s']:>8.1f}{first['bytes_in'] / mib:>10.1f} MiB{first['requests']:>13}"
          f"  {first['new_parts']} parts")
    print(f"{'rclone copy, first':<34}{results['rclone_first']['wall_s']:>8.1f}{'':>14}{'':>13}")
    stages = ", ".join(f"{k} {v['wall_s']:.1f}s/{v['requests']} req" for k, v in d["stages"].items())
    print(f"{'delta pass (FORCE_RESCAN=1)':<34}{d['wall_s']:>8.1f}{d['bytes_in'] / mib:>10.2f} MiB{d['requests']:>13}"
          f"  {d['new_parts']} new parts, {d['new_part_bytes'] / mib:.2f} MiB of files; {stages}")
    print(f"{'rclone copy, same change':<34}{r['wall_s']:>8.1f}{r['bytes_copied'] / mib:>10.2f} MiB{'-':>13}"
          f"  {r['files_copied']} files copied (every file compared)")
    print(f"{'pass with nothing changed':<34}{u['wall_s']:>8.1f}{u['bytes_in'] / mib:>10.2f} MiB{u['requests']:>13}"
          f"  {u['new_parts']} new parts")
    print(f"delta pass / rclone copy: {d['wall_s'] / max(r['wall_s'], 1e-9):.2f}x time; DESTINATION: {results['tree']}; "
          f"rclone's DESTINATION: {results['tree_rclone']}")
    print("(bytes sent: request bodies to S3, parts and records; the delta pass also reads the changed "
          "files at SOURCE and writes them at DESTINATION, as rclone does)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"written {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    ok = results["tree"] == "ok" and results["tree_rclone"] == "ok" and d["ok"] and u["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
