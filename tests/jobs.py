"""Watching and stopping a training job run as a subprocess (`python -m ray_jobs.train`), for the e2e tests: the
checkpoints Ray Train has registered, the job's own Ray processes (found from its driver's PID, never another job's),
how to kill it with its local cluster, and a cluster of several nodes on this machine whose nodes Ray drains as a
spot reclaim would."""
import json
import os
import re
import signal
import subprocess
import sys
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


def local_nodes(*cpus: float):
    """A Ray cluster of len(cpus) nodes on this machine (one raylet each; the head first), which jobs join by its
    address; (cluster, [worker nodes]). The test process does not connect to it."""
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()  # the test process's shared cluster (conftest.ray_cluster), if it runs, steps aside
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus[0], "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=c) for c in cpus[1:]]
    cluster.wait_for_nodes()
    return cluster, nodes


def drain_as_preempted(cluster, node) -> None:
    """Ray drains `node` as the autoscaler does for a reclaimed spot node (`ray drain-node`, reason preemption)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    done = subprocess.run([ray_cli, "drain-node", "--address", cluster.address, "--node-id", node.node_id,
                           "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                           "--deadline-remaining-seconds", "300"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
