"""Sequence classification end to end on one local Ray cluster (started once for the module): the real
SmolLM2 learning SST-2 sentiment, its adapter reloaded by the evaluate job, and a
tiny random Gemma-2 classifying pairwise preferences with LoRA on q/k/v of all but its first layer."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora import adapters
from qlora.jobs import evaluate, train
from qlora.config import JobConfig
from qlora.tracking import client

from conftest import ROOT


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory, smollm_dir) -> Path:
    """A 3-layer random Gemma-2 (the architecture of the pairwise GPU config) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       sliding_window=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-gemma2")
    Gemma2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def job(tmp_path: Path, model: dict, data: dict, train: dict, lora: dict | None = None) -> JobConfig:
    return JobConfig.model_validate({
        "model": {"task": "sequence_classification", **model}, "data": data, "lora": lora or {},
        "train": {"warmup_steps": 0, "log_every": 2, **train}, "evaluation": {"batch_size": 16},
        "scaling": {"num_workers": 1, "storage_path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "cls", "run_name": "cls"}})


def test_smollm2_learns_sst2_and_its_adapter_reproduces_the_metrics(ray_cluster, tmp_path):
    cfg = job(tmp_path, {"name": "smollm2-135m"},  # num_labels unset: inferred (2) from the labels
              {"path": str(ROOT / "data" / "sst2_sample.tsv"), "eval_path": str(ROOT / "data" / "sst2_dev_sample.tsv"),
               "format": "classification", "text_column": "sentence", "max_length": 48, "max_samples": 24,
               "eval_max_samples": 32},
              {"max_steps": 3, "batch_size": 8, "learning_rate": 2e-4})
    result = train.train(cfg)
    before, after = result["metrics_before"], result["metrics_after"]
    print(f"SST-2 held-out (32 records), before -> after 3 steps: {before} -> {after}")
    assert set(after) == set(before) == {"eval_loss", "accuracy", "log_loss"}
    assert 0 <= after["accuracy"] <= 1 and after["log_loss"] == pytest.approx(after["eval_loss"], rel=1e-3)
    assert after != before  # the head and LoRA moved (3 steps are too few to promise better metrics on CPU)

    # The adapter folder: LoRA weights, the trained head, and the config with the inferred class count.
    folder = Path(result["checkpoint"])
    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    heads = [k for k in weights if "score" in k]
    assert heads and weights[heads[0]].shape == (2, 576)
    saved = adapters.read_config(folder)
    assert saved.model.num_labels == 2 and saved.model.task == "sequence_classification"

    # The evaluate job (ray_jobs.evaluate) reloads the adapter: the metrics the worker reported, one prediction
    # per record.
    ref_folder, eval_cfg = adapters.load_job(str(folder), None, [])
    out = tmp_path / "eval"
    evaluated = evaluate.evaluate(str(folder), eval_cfg, ref_folder, str(out))
    assert evaluated["metrics"]["accuracy"] == pytest.approx(after["accuracy"], abs=1e-9)
    assert evaluated["metrics"]["log_loss"] == pytest.approx(after["log_loss"], abs=1e-5)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and {"record", "label", "predicted", "probabilities", "correct"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 32 == pytest.approx(after["accuracy"])
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == evaluated["metrics"]["accuracy"]

    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.value for m in c.get_metric_history(result["mlflow_run_id"], "accuracy")] == [after["accuracy"]]


def test_tiny_gemma2_pairwise_with_qkv_lora_skipping_layer_0(ray_cluster, tmp_path, tiny_gemma2_dir):
    cfg = job(tmp_path, {"name": str(tiny_gemma2_dir), "num_labels": 3, "attn_implementation": "eager"},
              {"path": str(ROOT / "data" / "pairwise_sample.csv"), "format": "pairwise", "max_length": 96,
               "kfold": {"folds": 4, "fold": 0}, "max_samples": 16},
              {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
              {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj"], "skip_first_layers": 1})
    result = train.train(cfg)
    after = result["metrics_after"]
    assert set(after) == {"eval_loss", "accuracy", "log_loss"} and all(torch.isfinite(torch.tensor(list(after.values()))))
    assert set(result["metrics_before"]) == set(after)

    folder = Path(result["checkpoint"])
    adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["layers_to_transform"] == [1, 2]
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    assert adapter_cfg["task_type"] == "SEQ_CLS"
    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    lora = sum(w.numel() for k, w in weights.items() if "lora_" in k)
    assert lora == 2 * 4 * ((64 + 64) + 2 * (64 + 32))  # layers 1-2 of 3; q: 64->64, k and v: 64->32
    assert not any(".layers.0." in k for k in weights)
    assert [w.shape for k, w in weights.items() if "score" in k] == [(3, 64)]
    run = client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.data.tags["lora_trainable_params"] == str(lora) and run.data.params["data.kfold.fold"] == "0"
