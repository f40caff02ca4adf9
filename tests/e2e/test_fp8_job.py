"""train.fp8_base through the real command line, in this test process on its shared local Ray cluster: the worker
switches the 4-bit base's layers to FP8 matmuls (torch's CPU FP8 matmul where this torch has the row-scaled one),
trains, evaluates and saves as any run does. The FP8 numerics are checked in tests/unit/test_fp8.py."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qlora import fp8
from ray_jobs import train

from conftest import ROOT

pytestmark = pytest.mark.skipif(not fp8.runs_rowwise_fp8(torch.device("cpu")),
                                reason="this torch's CPU FP8 matmul is per-tensor only")


def test_a_job_on_an_fp8_base_learns_and_saves_its_adapter(ray_cluster, tiny_model_dir, tmp_path, capsys):
    sets = [f"model.name={tiny_model_dir}", "train.fp8_base=true", "train.learning_rate=5e-3", "train.max_steps=4",
            "data.max_samples=32", "data.eval_max_samples=8", "evaluation.generate=false", "scaling.num_workers=1",
            f"scaling.storage_path={tmp_path / 'runs'}", "tracking.enabled=false", "tracking.run_name=fp8"]
    code = train.main(["--config", str(ROOT / "configs" / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0, out[-3000:]
    assert result["metrics_after"]["eval_loss"] < result["metrics_before"]["eval_loss"]
    weights = load_file(f"{result['adapter']}/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero: it trained
