"""Failures mid-run, one after another on the same run: a Ray Train worker killed (Ray restarts the worker
group, the loop resumes at the latest checkpoint's exact step), then the job driver killed with its
cluster and the newest checkpoint corrupted (the same command resumes from the previous intact one, in
the same MLflow run). The final adapter equals that of an uninterrupted run.

The run uses the LoRA variants too (DoRA, rsLoRA, Gaussian initialisation, LoRA+'s two learning rates), so their
extra state (DoRA's magnitudes, LoRA+'s optimizer parameter groups) is what must survive the failures; the
default LoRA path resumes in tests/e2e/test_fsdp.py."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml
from safetensors.torch import load_file

from qlora.tracking import client

from conftest import ROOT


def job_cmd(tmp_path: Path, model: Path, name: str) -> list[str]:
    cfg = {"model": {"name": str(model)},
           "lora": {"use_dora": True, "use_rslora": True, "init": "gaussian"},
           "data": {"path": str(ROOT / "data" / "people_json.jsonl"), "max_samples": 256, "eval_max_samples": 8,
                    "max_length": 128},
           "train": {"max_steps": 20, "batch_size": 4, "learning_rate": 5e-3, "log_every": 4, "save_every": 4,
                     "seed": 7, "loraplus_lr_ratio": 4},
           "evaluation": {"generate": False},
           "scaling": {"num_workers": 1, "storage_path": str(tmp_path / name), "max_failures": 2},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name, "run_name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "ray_jobs.train", "--config", str(path)]


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


def test_killed_worker_then_killed_driver_and_corrupt_checkpoint_resume_to_identical_result(tmp_path, tiny_model_dir):
    plain = subprocess.run(job_cmd(tmp_path, tiny_model_dir, "plain"), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    expected = json.loads(plain.stdout.strip().splitlines()[-1])

    cmd = job_cmd(tmp_path, tiny_model_dir, "killed")
    log_path = tmp_path / "first.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "killed" / "killed"
    # 1. Kill the worker once Ray has registered a checkpoint (its snapshot lists it), not merely written one.
    wait_for(lambda: registered_checkpoints(run_dir), proc, "a checkpoint")
    victims = train_worker_pids(proc)
    assert victims, "no Ray Train worker process found"
    for pid in victims:
        psutil.Process(pid).kill()
    # 2. Once the restarted group has resumed and checkpointed twice more, kill the driver and its cluster.
    def checkpointed_twice_after_the_restart() -> bool:
        # One read of each: Ray rewrites its snapshot while we poll, so two reads can disagree (seen: [] the second).
        resumed, registered = resumed_steps(log_path.read_text()), registered_checkpoints(run_dir)
        return bool(resumed) and len(registered) == 2 and registered[0][0] > resumed[0]

    wait_for(checkpointed_twice_after_the_restart, proc, "two checkpoints after the worker restart")
    kill_job(proc)
    first_log = log_path.read_text()
    resumed_at = resumed_steps(first_log)[0]
    assert resumed_at % 4 == 0 and 4 <= resumed_at < 20  # the latest checkpoint, not step 0
    # 3. Truncate the newest checkpoint's adapter: the resumed run must notice and take the previous one.
    (previous_step, _), (newest_step, newest) = registered_checkpoints(run_dir)
    weights = newest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert f"skipping corrupt checkpoint: {newest}" in out and "resuming from the previous intact checkpoint" in out
    assert resumed_steps(out) == [previous_step]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["steps"] == expected["steps"] == 20

    a = load_file(str(Path(expected["adapter"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(result["adapter"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lora_magnitude_vector" in k for k in a)  # DoRA's magnitudes saved
    groups = torch.load(Path(result["checkpoint"]) / "trainer_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [5e-3, 4 * 5e-3]  # LoRA+: A matrices, then B matrices x 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert abs(result["metrics_after"]["eval_loss"] - expected["metrics_after"]["eval_loss"]) < 1e-5

    # One MLflow run for the job across both submissions, finished, with its loss history continued.
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("killed").experiment_id])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]] and runs[0].info.status == "FINISHED"
    assert max(m.step for m in c.get_metric_history(result["mlflow_run_id"], "loss")) == 20

    # 4. The same run name with another learning rate is another run: refused before Ray starts, not resumed
    # into the old run's adapter (the same command with log_every changed would resume: it changes nothing).
    changed = subprocess.run(cmd + ["--set", "train.learning_rate=1e-4", "--set", "train.log_every=1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2, changed.stdout[-2000:] + changed.stderr[-2000:]
    error = json.loads(changed.stdout.strip().splitlines()[-1])["error"]
    assert "run killed has checkpoints" in error and "train.learning_rate: 0.005 in the run, 0.0001 now" in error
    assert "log_every" not in error and "fix: set tracking.run_name to a new name" in error
    assert "resuming" not in changed.stdout and "Started a local Ray instance" not in changed.stderr
