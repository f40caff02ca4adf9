"""Data at scale (issue 17): preparation time by record count, the reuse of the cache, and a 2-worker training job
on a large set against the same job on the quickstart's 480 records. Run alone on the machine (times are wall).

    python benchmarks/data_prep.py --sizes 50000,200000,1000000 --train 200000 --dir /tmp/qlora-bench

For each size: benchmarks/make_alpaca_records.py writes the jsonl (once), then `ray_jobs.train --dry-run` on
configs/quickstart.yaml with data.path set to it prepares the data (first: into an empty cache folder; second:
the same key, reused); each prints the preparation's own seconds (Ray Data pipeline or reuse) and the whole
command's. --train N runs `ray_jobs.train` for 4 steps on 2 CPU workers on N records and on the quickstart data:
each worker's peak resident memory (ru_maxrss, the job's peak_memory_gib_by_rank) and seconds from start to step 1.
Prints one JSON line per measurement and a summary table last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(args: list[str], env: dict) -> tuple[dict, float, dict]:
    """(the command's last JSON line, its wall seconds, {mark: seconds}) of `python -m ray_jobs.train ARGS`."""
    t0 = time.time()
    proc = subprocess.Popen([PY, "-m", "ray_jobs.train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)
    last, marks = {}, {}
    for line in proc.stdout:
        if line.startswith("{"):
            last = json.loads(line)
        if "[qlora] step 1/" in line and "first_step" not in marks:
            marks["first_step"] = round(time.time() - t0, 1)
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"ray_jobs.train {' '.join(args)} failed ({proc.returncode}): {last}")
    return last, round(time.time() - t0, 1), {**marks, "peak_gib_by_rank": last.get("peak_memory_gib_by_rank")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="50000,200000")
    p.add_argument("--train", type=int, default=0, help="records of the 2-worker training comparison (0: none)")
    p.add_argument("--dir", default="/tmp/qlora-bench")
    p.add_argument("--pipeline", default="auto")
    a = p.parse_args()
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QLORA_HOME": str(work / "home"), "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    files = {}
    for n in sorted({int(s) for s in a.sizes.split(",") if s} | ({a.train} if a.train else set())):
        files[n] = work / f"alpaca-{n}.jsonl"
        if not files[n].is_file():
            subprocess.run([PY, str(ROOT / "benchmarks" / "make_alpaca_records.py"), "--records", str(n),
                            "--out", str(files[n])], check=True)
    for n in [int(s) for s in a.sizes.split(",") if s]:
        shutil.rmtree(work / "home" / "runs" / "data_cache", ignore_errors=True)  # a first preparation
        common = ["--config", "configs/quickstart.yaml", "--set", f"data.path={files[n]}", "--set", "data.max_samples=null",
                  "--set", f"data.pipeline={a.pipeline}", "--set", "tracking.enabled=false", "--dry-run"]
        for attempt in ("first", "again"):
            out, wall, _ = run(common, env)
            row = {"records": n, "bytes": files[n].stat().st_size, "attempt": attempt, "wall_s": wall,
                   "reused": out["data_cache_reused"], "data_step_s": out["data_seconds"], "prep": out["data_preparation"],
                   "train_examples": out["records"], "tokens_p50": out["token_length_p50"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.train:
        # The quickstart's own data (the reference), and 480 records of the same generated file: its
        # examples are longer (cut at the quickstart's max_length), so only that pair isolates the set's size.
        jobs = {"quickstart (480 records)": [],
                f"480 of the {a.train} records": ["--set", f"data.path={files[a.train]}", "--set", "data.max_samples=480"],
                f"{a.train} records": ["--set", f"data.path={files[a.train]}", "--set", "data.max_samples=null"]}
        for name, extra in jobs.items():
            args = ["--config", "configs/quickstart.yaml", *extra, "--set", "train.max_steps=4", "--set",
                    "train.log_every=1", "--set", "evaluation.generate=false", "--set", "tracking.enabled=false"]
            run([*args, "--dry-run"], env)  # the cache present, as the target asks
            out, wall, marks = run(args, env)
            row = {"job": name, "wall_s": wall, "start_to_first_step_s": marks.get("first_step"),
                   "peak_gib_by_rank": marks["peak_gib_by_rank"], "steps": out.get("steps"),
                   "clock_tokens_per_second": out.get("clock_tokens_per_second")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| measurement | whole command, s | the job's data step, s | preparation |")
    print("|---|---:|---:|---|")
    for r in rows:
        if "records" in r:
            print(f"| {r['records']:,} records, {r['attempt']} | {r['wall_s']} | {r['data_step_s']} | {r['prep']} |")
        else:
            print(f"| {r['job']}: 2 workers x 4 steps | {r['wall_s']} | | start to step 1 {r['start_to_first_step_s']} s, "
                  f"peak RSS by rank {r['peak_gib_by_rank']} GiB |")


if __name__ == "__main__":
    main()
