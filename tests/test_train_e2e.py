"""The train job end to end on a real local Ray cluster (2 CPU workers, DDP over gloo), a real MLflow
sqlite store, and the job's own command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qlora import checkpoint, distributed, evaluation, modeling
from qlora.config import load_config
from qlora.data import prepare
from qlora.model_source import ModelSource
from qlora.tracking import client

from conftest import ROOT


def run_job(tmp_path: Path, model: str, overrides: list[str]) -> dict:
    cfg = {"model": {"name": model},
           "data": {"path": str(ROOT / "data" / "people_json.jsonl"), "format": "alpaca", "max_samples": 64,
                    "eval_max_samples": 16, "max_length": 128, "system_prompt": "Extract data."},
           "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 2e-3, "log_every": 2, "save_every": 2},
           "evaluation": {"num_generate": 4, "max_new_tokens": 24, "batch_size": 8},
           "scaling": {"num_workers": 2, "storage_path": str(tmp_path / "runs")},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "e2e", "run_name": "e2e"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--config", str(path), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["config_path"] = path
    return result


def reload_eval_loss(result: dict, model_dir: Path) -> float:
    """Load base + saved adapter in this process and recompute the held-out loss the workers reported."""
    from peft import PeftModel
    cfg = load_config(result["config_path"])
    source = ModelSource(str(model_dir), True, "test")
    tok = modeling.load_tokenizer(source, cfg)
    data = prepare(cfg.data, tok)
    base = modeling.load_base_model(cfg, source, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, result["adapter"])
    ctx = distributed.Context(0, 1, torch.device("cpu"))
    return evaluation.eval_loss(model, data.eval, tok.pad_token_id, 16, ctx)["eval_loss"]


def check_mlflow(tmp_path: Path, result: dict) -> None:
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("e2e")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result["mlflow_run_id"]  # one run, not one per worker
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "16" and run.data.tags["quantization"] == "bnb-4bit-nf4-dq"
    assert len(run.data.tags["data_hash"]) == 16
    assert len(c.get_metric_history(run.info.run_id, "loss")) >= 2
    assert {a.path for a in c.list_artifacts(run.info.run_id, "adapter_model/artifacts/adapter")} >= {
        "adapter_model/artifacts/adapter/adapter_config.json", "adapter_model/artifacts/adapter/adapter_model.safetensors"}
    assert "config.yaml" in {a.path for a in c.list_artifacts(run.info.run_id)}
    checkpoint.verify(Path(result["checkpoint"]))


def test_real_smollm2_learns_on_two_workers(tmp_path, smollm_dir):
    result = run_job(tmp_path, "smollm2-135m", [])
    before, after = result["metrics_before"], result["metrics_after"]
    assert after["eval_loss"] < 0.7 * before["eval_loss"], (before, after)
    assert after["exact_match"] >= before["exact_match"]
    assert reload_eval_loss(result, smollm_dir) == pytest.approx(after["eval_loss"], rel=1e-3)
    check_mlflow(tmp_path, result)
