"""The two SFT workflows end to end on their CPU configs, in-process on one local Ray cluster: Guanaco-style
`text` SFT with sequence packing, and chat SFT (messages, loss on assistant turns) with length-grouped
batches and a templated run name. Real SmolLM2-135M in NF4, real Ray Train, real MLflow (sqlite)."""
import math
from pathlib import Path


from qlora.jobs import train
from qlora.config import load_config
from qlora.tracking import RUN_NAME_TAG, client

from conftest import ROOT


def run(tmp_path: Path, config: str, extra: list[str]) -> tuple[dict, object]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(ROOT / "configs" / "cpu" / config, [
        f"data.path={ROOT / load_config(ROOT / 'configs' / 'cpu' / config).data.path}",
        "train.max_steps=2", "train.log_every=1", "data.eval_max_samples=4", "data.max_length=128", "scaling.num_workers=1",
        f"scaling.storage_path={tmp_path / 'runs'}", f"tracking.uri={uri}", *extra])
    result = train.train(cfg)
    runs = client(uri).search_runs([client(uri).get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result["mlflow_run_id"] and runs[0].info.status == "FINISHED"
    return result, runs[0]


def check_common(result: dict, mlflow_run, uri_path: Path) -> None:
    adapter = Path(result["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    before, after = result["metrics_before"], result["metrics_after"]
    assert set(before) == set(after) and "eval_loss" in before
    assert all(math.isfinite(v) for v in [*before.values(), *after.values()])
    assert after["eval_loss"] != before["eval_loss"]  # the adapter changed the model
    c = client(f"sqlite:///{uri_path}")
    losses = [m.value for m in c.get_metric_history(mlflow_run.info.run_id, "loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_guanaco_text_sft_with_packing(tmp_path, ray_cluster):
    result, mlflow_run = run(tmp_path, "guanaco_text_sft_smollm2.yaml", [])
    check_common(result, mlflow_run, tmp_path / "mlflow.db")
    assert mlflow_run.info.run_name == "guanaco-smollm2-r64-lr0.0002-steps2"  # template, resolved after --set
    assert mlflow_run.data.tags[RUN_NAME_TAG] == mlflow_run.info.run_name
    assert mlflow_run.data.params["data.packing"] == "True"
    # Packed rows of <= 128 tokens, each nearly full: almost no padding in the trained batches.
    efficiency = client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        mlflow_run.info.run_id, "packing_efficiency")
    assert len(efficiency) == 2 and all(m.value > 0.95 for m in efficiency)
    assert result["packing_efficiency"] > 0.95
    assert "exact_match" not in result["metrics_after"]  # text SFT scores the held-out loss only


def test_chat_sft_messages_with_templated_run_name(tmp_path, ray_cluster):
    result, mlflow_run = run(tmp_path, "chat_sft_smollm2.yaml",
                             ["data.max_samples=32", "evaluation.num_generate=2", "evaluation.max_new_tokens=8"])
    check_common(result, mlflow_run, tmp_path / "mlflow.db")
    assert mlflow_run.info.run_name == "smollm2-chat-r8-lr0.0005-n32-ep1"
    assert mlflow_run.data.params["lora.target_modules"] == str(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert "exact_match" in result["metrics_before"] and "exact_match" in result["metrics_after"]
    assert 0 < result["packing_efficiency"] <= 1  # unpacked: the share of real tokens in padded batches
    assert Path(result["checkpoint"]).parent.name == mlflow_run.info.run_name  # also the run folder
