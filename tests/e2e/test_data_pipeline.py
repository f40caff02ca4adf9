"""The prepared-data cache against the in-memory path, on the repository's data sets: the Ray Data pipeline and
the in-process executor give the same examples, the same statistics and the same micro-batches, batch by batch
on every rank, as preparing everything in memory (the path every job took before the cache)."""
import pytest

from qlora.config import load_config
from qlora.data import pipeline, prepare_in_memory
from qlora.batching import BatchPlan, train_batch

from conftest import ROOT

CASES = [  # id, config, overrides
    ("alpaca", "configs/quickstart.yaml", []),
    ("alpaca subset, group_by_length", "configs/quickstart.yaml", ["data.fraction=0.5", "train.group_by_length=true"]),
    ("alpaca packed", "configs/quickstart.yaml", ["data.packing=true", "data.max_length=256"]),
    ("messages", "configs/cpu/chat_sft_smollm2.yaml", []),
    ("sharegpt", "configs/cpu/sharegpt_sft_smollm2.yaml", []),
    ("text packed", "configs/cpu/guanaco_text_sft_smollm2.yaml", []),
    ("qa with eval_path", "configs/cpu/gsm8k_4bit.yaml", []),
    ("multiple_choice", "configs/cpu/qlora_recipe.yaml", []),
    ("classification tsv", "configs/cpu/sst2_classification.yaml", []),
    ("pairwise csv, stratified kfold", "configs/cpu/pairwise_preference.yaml", []),
]


def comparable(item: dict) -> dict:
    """What training and evaluation read of an item (the cache adds its position and record number)."""
    return {k: item[k] for k in ("input_ids", "labels", "position_ids", "example_lengths", "label", "prompt_ids",
                                 "reference") if k in item}


@pytest.mark.parametrize("config, overrides", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cached_preparation_equals_the_in_memory_path(ray_cluster, smollm_tokenizer, tmp_path, monkeypatch, config,
                                                     overrides):
    monkeypatch.chdir(ROOT)  # the configs' data paths are relative to the project
    cfg = load_config(ROOT / config, overrides)
    reference = prepare_in_memory(cfg.data, smollm_tokenizer)
    for executor in ("in_process", "ray_data"):
        data_cfg = cfg.data.model_copy(update={"pipeline": executor})
        plan = pipeline.plan(data_cfg, smollm_tokenizer, str(tmp_path / executor))
        assert plan.manifest is None and plan.executor == executor
        data = pipeline.prepare(plan)
        assert not data.reused and data.fmt == reference.fmt
        assert data.stats == reference.stats and data.lengths == reference.lengths
        assert [comparable(e) for e in data.eval] == [comparable(e) for e in reference.eval]
        plans = [BatchPlan(len(d.train), cfg, d.lengths) for d in (data, reference)]
        assert plans[0].per_epoch == plans[1].per_epoch
        for k in range(min(plans[0].total_steps * plans[0].per_step, 2 * plans[0].per_epoch)):
            batches = [train_batch([d.train[i] for i in p.micro_batch(k)[1]], 0, cfg.data.packing,
                                   cfg.data.max_length) for d, p in zip((data, reference), plans)]
            assert batches[0] == batches[1], f"{executor}: global micro-batch {k} differs"
        again = pipeline.plan(data_cfg, smollm_tokenizer, str(tmp_path / executor))
        assert again.manifest is not None and again.key == plan.key  # a later job finds it
        reopened = pipeline.prepare(again)
        assert reopened.reused and [comparable(e) for e in reopened.train] == [comparable(e) for e in data.train]
