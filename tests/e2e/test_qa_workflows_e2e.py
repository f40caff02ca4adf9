"""Issue 3 workflows end to end on one local Ray cluster (started once), through the in-process driver:
GSM8K question/answer SFT on a 4-bit SmolLM2 base (memory footprint, files beside the final adapter, generation
from the reloaded adapter) and its 8-bit config's base (a LoRA step and the footprint, in this process), and the
CPU variant of the original QLoRA recipe (added [PAD] token, source/target caps, multiple-choice accuracy before
and after).
Resuming from the last checkpoint is covered by tests/e2e/test_resume_equivalence.py."""
import json
from pathlib import Path

import torch
from safetensors import safe_open

from qlora import adapters, distributed, modeling
from qlora.jobs import generate
from qlora.jobs import train as train_job
from qlora.config import load_config
from qlora.model_source import ModelSource
from qlora.tracking import client

from conftest import ROOT

SHORT = ["train.max_steps=2", "train.batch_size=2", "train.log_every=1", "train.save_every=0",
         "data.eval_max_samples=2", "evaluation.num_generate=2", "evaluation.batch_size=4"]


def train(config: str, tmp_path: Path, name: str, overrides: list[str]) -> dict:
    cfg = load_config(ROOT / config, SHORT + overrides + [
        f"scaling.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.run_name={name}"])
    return train_job.train(cfg)


def files_beside_adapter(result: dict, n_predictions: int) -> dict:
    folder = Path(result["checkpoint"])
    metrics = json.loads((folder / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == n_predictions and all(p["prompt"] and "reference" in p for p in predictions)
    assert metrics["after"] == result["metrics_after"] and metrics["before"] == result["metrics_before"]
    assert json.loads((folder / "manifest.json").read_text()).keys() >= {"metrics.json", "predictions.jsonl"}
    return {"metrics": metrics, "predictions": predictions}


def test_gsm8k_on_4bit_and_8bit_bases(ray_cluster, tmp_path, smollm_dir):
    gen = ["data.max_length=128", "evaluation.max_new_tokens=16"]
    four = train("configs/cpu/gsm8k_4bit.yaml", tmp_path, "gsm8k-4bit", gen)
    out = files_beside_adapter(four, 2)
    assert {"exact_match", "final_number_match", "eval_loss"} <= out["metrics"]["after"].keys()
    assert all("final_number_correct" in p for p in out["predictions"])
    memory = out["metrics"]["memory"]
    assert memory["weights_gib"] == four["weights_memory_gib"] and memory["peak_gib"] > memory["weights_gib"]
    assert "resident set" in memory["peak_kind"]
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = c.search_runs([c.get_experiment_by_name("gsm8k-cpu").experiment_id])
    assert run.data.metrics["weights_memory_gib"] > 0 and run.data.metrics["peak_memory_gib"] > 0
    assert {"metrics.json", "predictions.jsonl"} <= {a.path for a in c.list_artifacts(run.info.run_id)}

    # The 8-bit config's base (bitsandbytes LLM.int8), in this process: a LoRA step gives finite, non-zero
    # gradients, and its linear weights take about twice the bytes of 4-bit ones (embeddings stay 32-bit).
    eight_cfg = load_config(ROOT / "configs/cpu/gsm8k_8bit.yaml", gen)
    assert eight_cfg.quantization.bits == 8
    source = ModelSource(str(smollm_dir), True, "smollm2-135m")
    base = modeling.load_base_model(eight_cfg, source, torch.device("cpu"))
    eight = modeling.attach_lora(base, eight_cfg.lora)
    ids = modeling.load_tokenizer(source, eight_cfg)("Tom has 3 apples and buys 4 more.", return_tensors="pt").input_ids
    eight(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in eight.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert distributed.frozen_gib(eight) > 1.2 * four["weights_memory_gib"]

    # Reload the saved 4-bit adapter (ray_jobs.generate's path: a Ray task) and answer a new question.
    folder = adapters.resolve(four["checkpoint"])
    cfg = adapters.read_config(folder)
    out = generate.generate(cfg, folder, ["Tom has 3 apples and buys 4 more. How many apples does he have?"], 8,
                                compare_base=True)
    assert len(out["completions"]) == 1 and out["completions"][0].strip()
    assert len(out["base_completions"]) == 1 and out["base_completions"][0].strip()  # the adapter switched off


def test_qlora_recipe_cpu_variant(ray_cluster, tmp_path):
    few = tmp_path / "mc.jsonl"  # 8 of the 100 held-out questions: CPU time
    few.write_text("".join((ROOT / "data" / "sst2_mc_eval.jsonl").read_text().splitlines(keepends=True)[:8]))
    result = train("configs/cpu/qlora_recipe.yaml", tmp_path, "recipe",
                   ["train.batch_size=4", "train.max_steps=3", "train.learning_rate=1e-3",
                    "evaluation.max_new_tokens=2", f"evaluation.multiple_choice_path={few}"])
    out = files_beside_adapter(result, 2)
    before, after = out["metrics"]["before"], out["metrics"]["after"]
    assert 0.0 <= before["mc_accuracy"] <= 1.0 and 0.0 <= after["mc_accuracy"] <= 1.0
    assert after["eval_loss"] < before["eval_loss"]  # the answer letters are being learned
    folder = Path(result["checkpoint"])
    cfg = adapters.read_config(folder)
    assert cfg.model.pad_token == "add" and cfg.data.max_source_length == 120
    with safe_open(str(folder / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)  # adapter only: the [PAD] rows are re-created at load
    assert (folder / "trainer_state.pt").is_file()  # what resuming needs (tests/e2e/test_resume_equivalence.py)
