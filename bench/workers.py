"""workers.py: the pipeline with 1, 2 and 3 workers per stage on one migration (issue 9).

    bash bench/run.sh --workers            (through bench/run.sh, which prepares .venv)
    python bench/workers.py [--small N] [--folders N] [--hub rclone|moto|both] [--counts 1,2,3]

For each hub and each worker count it generates nothing new: one small-file set (bench.py's
generator) is made once; each run starts with an empty bucket and DESTINATION, then runs every
stage with N workers at once (each its own WORK_DIR, WORKER_ID, WORKER_INDEX, WORKER_COUNT=N)
and waits for all of them. It prints the wall time of each stage, the parts made, the cost per
part (worker-seconds per part) and whether DESTINATION equals SOURCE, and writes the same as JSON.

Hubs: ``rclone serve s3`` ignores conditional writes, so the workers split the folders by static
shards; moto's server (a test dependency, installed by scripts/test.sh) enforces them, so the
workers take units by claims on S3. Every figure comes from this machine: on a 2-core machine
more workers than cores measure contention, not the scaling of separate machines (see
docs/SCALING.md for how the figures are used).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the generator, the servers and the tree check)


class MotoHub:
    """moto's server on 127.0.0.1 in its own process (it enforces conditional writes)."""

    def __init__(self, log_dir: str):
        port = bench.free_port()
        self.key, self.secret = "bench-moto", "bench-moto-secret"
        with open(os.path.join(log_dir, "server-moto.log"), "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=bench.clean_env())
        bench.REG.add_service("moto", self.proc)
        bench.wait_port(port, self.proc, "moto server")
        self.url = f"http://127.0.0.1:{port}"

    def boto3(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")


def run_stage(script: str, n: int, base_env: dict, work: str, logs: str, label: str) -> dict:
    procs = []
    t0 = time.perf_counter()
    for i in range(n):
        env = {**base_env, "WORK_DIR": os.path.join(work, f"work-{i}"), "WORKER_ID": f"w{i}",
               "WORKER_COUNT": str(n), "WORKER_INDEX": str(i)}
        out = open(os.path.join(logs, f"{label}-{script}-w{i}.log"), "wb")
        procs.append((subprocess.Popen([sys.executable, os.path.join(bench.REPO, script)], env=env,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True), out))
    codes = []
    for proc, out in procs:
        codes.append(proc.wait())
        out.close()
    return {"wall_s": time.perf_counter() - t0, "codes": codes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=20000, help="small files (1-64 KiB) [20000]")
    ap.add_argument("--folders", type=int, default=300, help="folders [300]")
    ap.add_argument("--hub", default="both", choices=("rclone", "moto", "both"))
    ap.add_argument("--counts", default="1,2,3", help="worker counts to run [1,2,3]")
    ap.add_argument("--parallel", default="2", help="MAX_PARALLEL_WORKERS of each worker [2]")
    ap.add_argument("--out", default=os.path.join(bench.REPO, "bench_out", "workers.json"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-workers-")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    rclone = shutil.which("rclone") or os.path.join(os.path.dirname(sys.executable), "rclone")
    gen_args = argparse.Namespace(seed=args.seed, small=args.small, folders=args.folders, large=0, large_mib=1)
    source = os.path.join(work, "source")
    info = bench.generate_set("small", source, gen_args)
    snap = bench.snapshot(source)
    bench.log(f"small set: {info['files']} files, {info['bytes'] / bench.MIB:.1f} MiB, "
              f"{info['top_level_folders']} top-level folders")
    results = []
    hubs = ("rclone", "moto") if args.hub == "both" else (args.hub,)
    try:
        for hub_name in hubs:
            hub = (bench.S3Server("hub", os.path.join(work, "hub"), rclone, logs) if hub_name == "rclone"
                   else MotoHub(logs))
            proxy = bench.Proxy(hub_name, hub.url, logs)  # counts every S3 request of the workers
            for n in [int(c) for c in args.counts.split(",")]:
                label = f"{hub_name}-{n}"
                bucket = f"hub-{hub_name}-{n}"
                hub.boto3().create_bucket(Bucket=bucket)
                dest = os.path.join(work, f"dest-{label}")
                env = {**bench.clean_env(), "PATH": os.path.dirname(rclone) + os.pathsep + os.environ["PATH"],
                       "SOURCE": source, "DESTINATION": dest, "S3_BUCKET": bucket, "S3_ENDPOINT": proxy.url,
                       "AWS_ACCESS_KEY_ID": hub.key, "AWS_SECRET_ACCESS_KEY": hub.secret,
                       "AWS_REGION": "us-east-1", "RCLONE_CONFIG": os.devnull,
                       "MAX_PARALLEL_WORKERS": args.parallel, "LEASE_SECONDS": "60",
                       "PROGRESS_INTERVAL": "600"}
                row = {"hub": hub_name, "workers": n, "mode": "shards" if hub_name == "rclone" else "claims"}
                total = 0.0
                for stage, script in bench.SCRIPTS:
                    before = proxy.stats()
                    r = run_stage(script, n, env, work, logs, label)
                    r["requests"] = bench.stats_diff(before, proxy.stats())["total"]
                    row[stage] = r
                    total += r["wall_s"]
                    bench.log(f"{label}: {stage} {r['wall_s']:.1f}s exit codes {r['codes']}")
                row["total_s"] = total
                index = max((k for k in list_keys(hub, bucket) if k.endswith("/index.json")), default=None)
                parts = 0
                if index:
                    body = json.loads(hub.boto3().get_object(Bucket=bucket, Key=index)["Body"].read())
                    parts = sum(len(f.get("part_table") or []) for f in body["folders"])
                row["parts"] = parts
                row["tree"] = bench.check_tree(snap, dest)["summary"]
                results.append(row)
                shutil.rmtree(dest, ignore_errors=True)
            proxy.stop()
            hub.stop() if hasattr(hub, "stop") else bench.REG.stop_service(hub.proc)
    finally:
        bench.REG.cleanup()
    print(f"\n== {info['files']} files, {info['bytes'] / bench.MIB:.1f} MiB, {args.folders} folders; "
          f"MAX_PARALLEL_WORKERS={args.parallel} per worker; {os.cpu_count()} CPUs")
    print(f"{'hub (mode)':<18}{'workers':>8}{'mapper s':>10}{'zipper s':>10}{'unzipper s':>11}{'total s':>9}"
          f"{'parts':>7}{'worker-s/part':>15}{'S3 req':>8}{'req/part':>9}  tree")
    for r in results:
        per_part = sum(r[s]["wall_s"] * r["workers"] for s in ("zipper", "unzipper")) / max(1, r["parts"])
        r["worker_s_per_part"] = per_part
        requests = sum(r[s]["requests"] for s in ("mapper", "zipper", "unzipper"))
        r["requests"] = requests
        ok = all(c == 0 for s in ("mapper", "zipper", "unzipper") for c in r[s]["codes"])
        print(f"{r['hub'] + ' (' + r['mode'] + ')':<18}{r['workers']:>8}{r['mapper']['wall_s']:>10.1f}"
              f"{r['zipper']['wall_s']:>10.1f}{r['unzipper']['wall_s']:>11.1f}{r['total_s']:>9.1f}{r['parts']:>7}"
              f"{per_part:>15.2f}{requests:>8}{requests / max(1, r['parts']):>9.1f}  {r['tree']}{'' if ok else ' (a worker exited non-zero; logs: ' + logs + ')'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"set": info, "results": results, "cpus": os.cpu_count()}, fh, indent=1)
    print(f"written {args.out}")
    shutil.rmtree(os.path.join(work, "source"), ignore_errors=True)
    return 0 if all(r["tree"] == "ok" for r in results) else 1


def list_keys(hub, bucket: str) -> list[str]:
    keys = []
    for page in hub.boto3().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


if __name__ == "__main__":
    sys.exit(main())
