"""Watching and stopping a training job run as a subprocess (`python -m ray_jobs.train`), for the e2e tests: the
checkpoints Ray Train has registered, the job's own Ray processes (found from its driver's PID, never another job's),
and how to kill it with its local cluster."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil


def registered_checkpoints(run_dir: Path) -> list:
    """(step, folder) of the checkpoints Ray Train has registered for the run, oldest first."""
    try:
        results = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [(r["metrics"]["step"], run_dir / r["checkpoint_dir_name"]) for r in results]


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def job_processes(job: subprocess.Popen, *kinds: str) -> list[psutil.Process]:
    """The Ray processes of kinds (RayTrainWorker, TrainController) that belong to this test's job: descendants
    of its driver, whose `ray.init` started the local cluster they run in. Other Ray jobs on the machine (another
    test run, a user's training) are never touched."""
    found = []
    try:
        descendants = psutil.Process(job.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # the driver has exited (and shut its cluster down)
        return []
    for p in descendants:
        try:
            if any(k in " ".join(p.cmdline()) for k in kinds):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def train_worker_pids(job: subprocess.Popen) -> list[int]:
    return sorted(p.pid for p in job_processes(job, "RayTrainWorker"))


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a job's driver (started with start_new_session) and the local cluster it started. That cluster
    outlives the driver for a moment (its processes are not in the driver's process group) and could still
    register a checkpoint: its Train controller and workers go with it."""
    stragglers = job_processes(proc, "RayTrainWorker", "TrainController")
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for p in stragglers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    time.sleep(2)


def resumed_steps(log: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"resumed from checkpoint at step (\d+)", log)]
