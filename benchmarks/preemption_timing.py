"""A training job sent a preemption notice: SIGTERM to one of its Ray Train workers once the job logs step
--at-step, then what the notice cost, from the job's streamed log (each line timestamped as it arrives).

    python3 benchmarks/preemption_timing.py --at-step 12 --log job.log -- --config CONFIG [--set k=v ...]

Prints one JSON line: the worker's own measure of notice -> checkpoint written and registered (its log line),
SIGTERM -> the signalled worker process gone, SIGTERM -> the run resumed and its next step logged, the notice
checkpoint's size, and the job's final steps, preemptions and exit code.
"""
import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

STEP = re.compile(r"\[qlora\] step (\d+)/\d+")
WRITTEN = re.compile(r"checkpoint at step (\d+) written and registered ([\d.]+) s after the notice")
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")


def train_workers(driver: psutil.Process) -> list[psutil.Process]:
    """The job's Ray Train workers: descendants of its driver (whose ray.init started the local cluster)."""
    found = []
    for p in driver.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def watch_exit(process: psutil.Process, t0: float, marks: dict) -> None:
    """Mark when the signalled worker process is gone (polled every 50 ms)."""
    while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    marks["worker_gone"] = time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--at-step", type=int, required=True)
    p.add_argument("--log", required=True)
    args, job_args = p.parse_known_args()
    cmd = [sys.executable, "-m", "ray_jobs.train", *[a for a in job_args if a != "--"]]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks, victim, out, lines = {}, None, {}, []
    with open(args.log, "w") as log:
        for line in proc.stdout:
            now = time.time() - t0
            log.write(f"{now:8.2f} {line}")
            lines.append(line)
            step = STEP.search(line)
            if victim is None and step and int(step.group(1)) >= args.at_step:
                workers = train_workers(psutil.Process(proc.pid))
                victim = workers[-1]
                marks["sigterm"] = now
                victim.send_signal(signal.SIGTERM)
                threading.Thread(target=watch_exit, args=(victim, t0, marks), daemon=True).start()
            if (m := WRITTEN.search(line)) and "written" not in marks:
                marks["written"] = now
                out.update(notice_step=int(m.group(1)), notice_to_registered_s=float(m.group(2)))
            if (m := RESUMED.search(line)) and "sigterm" in marks and "resumed" not in marks:
                marks["resumed"] = now
            if step and "resumed" in marks and "next_step" not in marks:
                marks["next_step"] = now
    rc = proc.wait()
    result = json.loads([x for x in lines if x.startswith("{")][-1])
    since = {k: round(v - marks["sigterm"], 2) for k, v in marks.items() if k != "sigterm" and "sigterm" in marks}
    folder = Path(result["checkpoint"]) if "checkpoint" in result else None  # the final one: the same files, and more
    out.update(exit_code=rc, sigterm_at_s=round(marks.get("sigterm", -1), 1),
               **{f"sigterm_to_{k}_s": v for k, v in since.items()},
               steps=result.get("steps"), preemptions=result.get("preemptions"), restarts=result.get("restarts"),
               checkpoint_mb=round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)
               if folder else None, clock_tokens_per_second=result.get("clock_tokens_per_second"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
