"""ray_jobs.export: the adapter-only export, and --merge into a standalone model whose logits match the
quantized base + adapter (computed here independently with plain transformers + peft)."""
import json

import pytest
import torch

from qlora import checkpoint, modeling
from qlora.config import load_config
from qlora.model_source import resolve
from ray_jobs import export

from conftest import ROOT

PROBE = ["Alice is 30 and lives in Paris.", "The capital of Italy is Rome, a city of three million people."]


def trained_adapter(folder, config_path, model_dir, bits, sets=()):
    """An adapter as a training run leaves it (adapter/, config.yaml, manifest.json), with random LoRA B
    weights (and DoRA magnitudes) standing in for training so that the adapter changes the logits."""
    cfg = load_config(config_path, [f"model.name={model_dir}", f"quantization.bits={bits}", "tracking.enabled=false",
                                    "scaling.num_workers=1", *sets])
    source = resolve(cfg.model.name)
    tok = modeling.load_tokenizer(source, cfg)
    model = modeling.attach_lora(modeling.load_base_model(cfg, source, torch.device("cpu"), tok.pad_token_id),
                                 cfg.lora, cfg.model.task)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
        if "lora_magnitude_vector" in name:
            p.data = p.data * (1 + 0.1 * torch.randn(p.shape, generator=gen))
    checkpoint.save(folder, model, cfg)
    return cfg


def logits(model, tok, texts):
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float(), batch["attention_mask"].bool()


@pytest.mark.parametrize("config, bits, sets", [
    ("configs/quickstart.yaml", 4, ()), ("configs/cpu/sst2_classification.yaml", 8, ()),
    ("configs/quickstart.yaml", 4, ("lora.use_dora=true", "lora.use_rslora=true"))],
    ids=["causal-lm-nf4", "classifier-int8", "causal-lm-nf4-dora-rslora"])
def test_merged_model_matches_quantized_base_plus_adapter(ray_cluster, tiny_model_dir, tmp_path, config, bits, sets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    cfg = trained_adapter(tmp_path / "run", ROOT / config, tiny_model_dir, bits, sets)
    out = tmp_path / "merged"
    assert export.main(["--adapter", str(tmp_path / "run"), "--out", str(out), "--merge", "--dtype", "float32"]) == 0

    cls = AutoModelForSequenceClassification if cfg.model.task == "sequence_classification" else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(out)
    tok.pad_token = tok.pad_token or tok.eos_token
    merged = cls.from_pretrained(out, dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # plain weights

    extra = {"num_labels": cfg.model.num_labels, "pad_token_id": tok.pad_token_id} if cls is not AutoModelForCausalLM else {}
    qconf = modeling.quantization_config(cfg.quantization, torch.float32)
    reference = PeftModel.from_pretrained(
        cls.from_pretrained(tiny_model_dir, quantization_config=qconf, dtype=torch.float32, **extra),
        str(tmp_path / "run" / "adapter")).eval()
    # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first eval forward, after
    # which they no longer dequantize, and DoRA dequantizes them for its norms (plain peft here: 0.042 off on
    # this CPU). The training path turns the repacking off; so does the reference.
    modeling.keep_cpu_weights_trainable(reference)
    want, mask = logits(reference, tok, PROBE)
    got, _ = logits(merged, tok, PROBE)
    plain, _ = logits(cls.from_pretrained(tiny_model_dir, dtype=torch.float32, **extra).eval(), tok, PROBE)
    if cls is AutoModelForCausalLM:  # compare real tokens only
        want, got, plain = want[mask], got[mask], plain[mask]
    diff = (got - want).abs().max().item()
    effect = (plain - want).abs().max().item()
    print(f"\n{config} {bits}-bit: max |merged - (base + adapter)| = {diff:.2e}; adapter's own effect {effect:.2e}")
    assert diff < 1e-2 and effect > 10 * diff


def test_adapter_export_is_complete_and_loads_with_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    trained_adapter(tmp_path / "run", ROOT / "configs/quickstart.yaml", tiny_model_dir, 4)
    out = tmp_path / "exported"
    assert export.main(["--adapter", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert {"adapter", "config.yaml", "manifest.json", "README.md"} <= {p.name for p in out.iterdir()}
    checkpoint.verify(out)  # every file's sha256 as listed
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    # Nothing is overwritten.
    assert export.main(["--adapter", str(tmp_path / "run"), "--out", str(out)]) == 2


def test_merge_by_default_takes_the_smallest_dtype_that_passes_the_parity_check(ray_cluster, tiny_model_dir,
                                                                                tmp_path, capsys):
    from qlora.jobs.export import MERGE_ORDER, MERGE_TOLERANCE
    trained_adapter(tmp_path / "run", ROOT / "configs/quickstart.yaml", tiny_model_dir, 4)
    assert export.main(["--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--merge"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tried = result["tried"]
    assert list(tried) == list(MERGE_ORDER[:len(tried)]) and result["dtype"] == list(tried)[-1]
    assert result["max_logit_diff"] <= MERGE_TOLERANCE[result["dtype"]]
    assert all(tried[d] > MERGE_TOLERANCE[d] for d in list(tried)[:-1])  # each one passed over failed the check
    assert (tmp_path / "m" / "config.json").is_file()


def test_merging_into_a_quantized_dtype_is_refused(tiny_model_dir, tmp_path, capsys):
    trained_adapter(tmp_path / "run", ROOT / "configs/quickstart.yaml", tiny_model_dir, 4)
    assert export.main(["--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--merge",
                        "--dtype", "nf4"]) == 2
    err = capsys.readouterr()
    assert "rounds every merged weight back to nf4" in err.out + err.err and not (tmp_path / "m").exists()


def test_evaluate_job_splits_the_held_out_set_over_ray_train_workers(ray_cluster, tiny_model_dir, tmp_path):
    """ray_jobs.evaluate with scaling.num_workers=2 runs on a Ray Train worker group, each worker scoring
    its share: the same metrics as one worker, and every prediction once, in record order."""
    from qlora import adapters
    from qlora.jobs import evaluate
    trained_adapter(tmp_path / "run", ROOT / "configs/quickstart.yaml", tiny_model_dir, 4)
    runs = {}
    for n in (1, 2):
        folder, cfg = adapters.load_job(str(tmp_path / "run"), None, [
            f"scaling.num_workers={n}", "evaluation.num_generate=8", "evaluation.max_new_tokens=4",
            f"scaling.storage_path={tmp_path / 'runs'}"])
        result = evaluate.evaluate(str(tmp_path / "run"), cfg, folder, str(tmp_path / f"eval{n}"))
        lines = (tmp_path / f"eval{n}" / "predictions.jsonl").read_text().splitlines()
        runs[n] = result["metrics"], [json.loads(line)["prompt"] for line in lines]
    (one, prompts_one), (two, prompts_two) = runs[1], runs[2]
    assert one.keys() == two.keys() >= {"eval_loss", "exact_match"}
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-3)  # batches are padded differently
    assert prompts_two == prompts_one and len(prompts_one) == 8


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/cpu/sst2_classification.yaml"],
                         ids=["causal-lm", "classifier"])
def test_the_registered_mlflow_model_predicts_what_the_adapter_does(tiny_model_dir, tmp_path, monkeypatch, config):
    """The adapter as the train job logs it (qlora/mlflow_model.py, a model from code) and registers it, loaded back
    by MLflow from the registry: its predict on a list and on a DataFrame equals the task's predict on the adapter
    loaded directly."""
    import mlflow
    import pandas as pd

    from qlora import adapters, tasks, tracking
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the current folder
    cfg = trained_adapter(tmp_path / "run", ROOT / config, tiny_model_dir, 4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "models", "log-model", {}, {})
    logged = adapters.log_to_mlflow(uri, run_id, tmp_path / "run", {"base_model": str(tiny_model_dir)}, "tiny")
    assert logged["registered_uri"] == "models:/tiny/1"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(logged["registered_uri"])

    task = tasks.for_config(cfg)
    direct, tok = adapters.load_for_inference(cfg, tmp_path / "run", torch.device("cpu"))
    if task.can_generate:
        rows, frame = PROBE, pd.DataFrame({"prompt": PROBE})
    else:
        rows = [{cfg.data.text_column: text} for text in PROBE]
        frame = pd.DataFrame(rows)
    expected = task.predict(direct, tok, cfg, rows, cfg.evaluation.max_new_tokens)
    assert len(expected) == len(PROBE)
    assert model.predict(rows) == expected
    assert model.predict(frame) == expected
