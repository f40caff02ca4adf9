"""A Ray Train worker killed mid-run: Ray restarts the worker group, the loop resumes from the latest
checkpoint at its exact step, and the final adapter equals that of an uninterrupted run."""
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT


def job_cmd(tmp_path: Path, model: Path, name: str) -> list[str]:
    cfg = {"model": {"name": str(model)},
           "data": {"path": str(ROOT / "data" / "people_json.jsonl"), "max_samples": 256, "eval_max_samples": 8,
                    "max_length": 128},
           "train": {"max_steps": 40, "batch_size": 8, "learning_rate": 5e-3, "log_every": 5, "save_every": 5,
                     "seed": 7},
           "evaluation": {"generate": False},
           "scaling": {"num_workers": 1, "storage_path": str(tmp_path / name), "max_failures": 2},
           "tracking": {"enabled": False, "run_name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "ray_jobs.train", "--config", str(path)]


def registered_checkpoints(run_dir: Path) -> list:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def train_worker_pids() -> list[int]:
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            pids.append(p.pid)
    return pids


def test_killed_worker_resumes_at_exact_step_with_identical_result(tmp_path, tiny_model_dir):
    plain = subprocess.run(job_cmd(tmp_path, tiny_model_dir, "plain"), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    expected = json.loads(plain.stdout.strip().splitlines()[-1])

    proc = subprocess.Popen(job_cmd(tmp_path, tiny_model_dir, "killed"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "killed" / "killed"
    deadline = time.time() + 300
    # Kill once Ray has registered a checkpoint (its snapshot lists it), not merely when the folder appears.
    while time.time() < deadline and not registered_checkpoints(run_dir):
        assert proc.poll() is None, "the run ended before a worker could be killed"
        time.sleep(0.2)
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    for pid in victims:
        psutil.Process(pid).kill()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    resumed_at = [int(line.rsplit(" ", 1)[-1]) for line in out.splitlines() if "resumed from checkpoint at step" in line]
    assert resumed_at and resumed_at[0] % 5 == 0 and 5 <= resumed_at[0] < 40  # the latest checkpoint, not step 0
    assert result["steps"] == expected["steps"] == 40

    a = load_file(str(Path(expected["adapter"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(result["adapter"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert result["metrics_after"]["eval_loss"] == expected["metrics_after"]["eval_loss"] or abs(
        result["metrics_after"]["eval_loss"] - expected["metrics_after"]["eval_loss"]) < 1e-5
