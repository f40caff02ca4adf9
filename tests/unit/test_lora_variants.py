"""The LoRA variants on a real bitsandbytes 4-bit tiny Llama: DoRA and rsLoRA counted and applied by peft, LoRA+'s
parameter groups, their refusals, and what the memory estimate and the FLOP counter add for DoRA. LoftQ (CUDA only
in peft) is tested by tests/unit/test_gpu.py. Their state through a checkpoint: here; merging them:
tests/e2e/test_export.py."""
import math

import pytest
import torch
from pydantic import ValidationError

from qlora import memory_estimate, mfu, modeling
from qlora.config import JobConfig
from qlora.model_source import ModelSource
from qlora.strategies.base import optimizer_params
from qlora.train_step import make_optimizer, make_scheduler


def config(model_dir, lora=None, train=None, **sections) -> JobConfig:
    return JobConfig.model_validate({"model": {"name": str(model_dir)}, "data": {"path": "x.jsonl"},
                                     "lora": lora or {}, "train": train or {}, **sections})


def lora_model(model_dir, **lora):
    cfg = config(model_dir, lora)
    source = ModelSource(str(model_dir), True, "tiny")
    torch.manual_seed(0)
    model = modeling.attach_lora(modeling.load_base_model(cfg, source, torch.device("cpu")), cfg.lora)
    modeling.init_lora_weights(model, cfg.lora, source)
    return model


def test_dora_count_includes_one_magnitude_per_output_feature(tiny_model_dir):
    """attach_lora checks peft's trainable count against the independent one, which adds DoRA's vectors."""
    plain, dora = lora_model(tiny_model_dir), lora_model(tiny_model_dir, use_dora=True)
    outputs = sum(m.get_base_layer().out_features for m in dora.modules() if getattr(m, "lora_magnitude_vector", None))
    assert outputs == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # q k v o gate up down, 2 layers
    assert modeling.lora_param_count(dora) == modeling.lora_param_count(plain) + outputs


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_model_dir):
    q = lora_model(tiny_model_dir, r=16, alpha=32, use_rslora=True).base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(32 / math.sqrt(16))
    q = lora_model(tiny_model_dir, r=16, alpha=32).base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(32 / 16)


def test_loraplus_gives_the_b_matrices_their_own_learning_rate(tiny_model_dir):
    """peft's LoRA+ grouping, in our optimizer: A matrices at train.learning_rate, B at ratio x; the cosine
    schedule scales both, so the ratio holds at every step."""
    model = lora_model(tiny_model_dir, use_dora=True)
    cfg = config(tiny_model_dir, {"use_dora": True}, {"learning_rate": 1e-3, "loraplus_lr_ratio": 16,
                                                      "lr_scheduler": "cosine", "warmup_steps": 1})
    optimizer = make_optimizer(cfg, optimizer_params(model, cfg))
    names = {id(p): n for n, p in model.named_parameters()}
    a, b = optimizer.param_groups
    assert a["lr"] == 1e-3 and b["lr"] == 16e-3
    assert all("lora_A" in names[id(p)] for p in a["params"])
    assert all("lora_B" in names[id(p)] or "magnitude" in names[id(p)] for p in b["params"])
    assert len(a["params"]) + len(b["params"]) == sum(p.requires_grad for p in model.parameters())
    scheduler = make_scheduler(cfg, optimizer, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert b["lr"] == pytest.approx(16 * a["lr"]) and 0 < a["lr"] < 1e-3
    assert optimizer_params(model, config(tiny_model_dir)) == [p for p in model.parameters() if p.requires_grad]


def test_dora_rslora_and_loraplus_state_survive_a_checkpoint_exactly(tiny_model_dir, tmp_path):
    """What a resumed run restores (qlora.worker.resume_adapter and restore_trainer): DoRA's magnitudes in the
    adapter, LoRA+'s two parameter groups and their AdamW moments in the trainer state. A restored model and
    optimizer then take the very step the uninterrupted ones take."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from qlora import checkpoint
    variants = {"use_dora": True, "use_rslora": True, "init": "gaussian"}
    cfg = config(tiny_model_dir, variants, {"learning_rate": 5e-3, "loraplus_lr_ratio": 4, "max_steps": 4})
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))

    def step(model, optimizer, scheduler):
        torch.manual_seed(7)  # the same dropout masks (the worker seeds each micro-batch: qlora.batching)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()

    runs = []
    for _ in range(2):  # the uninterrupted run, and the one restored from its checkpoint after step 1
        model = lora_model(tiny_model_dir, **variants)
        optimizer = make_optimizer(cfg, optimizer_params(model, cfg))
        runs.append((model, optimizer, make_scheduler(cfg, optimizer, 4)))
    step(*runs[0])
    folder = checkpoint.save(tmp_path / "ckpt", runs[0][0], cfg, runs[0][1].state_dict(), runs[0][2], {"step": 1})
    saved = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in saved)  # DoRA's magnitudes are in the adapter
    model, optimizer, scheduler = runs[1]
    set_peft_model_state_dict(model, saved)
    state = checkpoint.load_trainer_state(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert [g["initial_lr"] for g in optimizer.param_groups] == [5e-3, 4 * 5e-3]  # LoRA+: A, then B x 4
    step(*runs[0])
    step(model, optimizer, scheduler)
    after = {n: p for n, p in runs[0][0].named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, after[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("sections, message", [
    ({"lora": {"init": "pissa"}}, "lora.init=pissa starts the adapter"),
    ({"lora": {"init": "olora"}}, "peft cannot do on bitsandbytes"),
    ({"lora": {"init": "loftq"}, "quantization": {"bits": 8}}, "lora.init=loftq fits the adapter to the 4-bit"),
    ({"lora": {"init": "loftq"}}, "peft computes the LoftQ fit on a CUDA"),
    ({"train": {"loraplus_lr_ratio": 16}, "scaling": {"strategy": "deepspeed"}}, r"LoRA\+ needs two optimizer"),
    ({"lora": {"use_dora": True}, "scaling": {"strategy": "fsdp"}}, "with lora.use_dora=true is not verified"),
    ({"train": {"loraplus_lr_ratio": 0}}, "greater than 0"),
])
def test_variant_refusals_name_the_field_and_the_fix(tmp_path, sections, message):
    with pytest.raises(ValidationError, match=message):
        config(tmp_path, **sections)


def test_loftq_without_safetensors_is_refused_before_any_cluster(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Exception, match="lora.init=loftq reads the full-precision weights"):
        lora = config(tmp_path, {"init": "loftq"}, scaling={"use_gpu": True}).lora
        modeling.check_lora_init(lora, ModelSource(str(tmp_path), True, "x"))


def test_dora_work_in_the_memory_estimate_and_the_flop_count(tiny_model_dir):
    plain, dora = lora_model(tiny_model_dir), lora_model(tiny_model_dir, use_dora=True, r=4)
    layers, rank = mfu.dora_layers(dora)
    assert rank == 4 and len(layers) == 14 and mfu.dora_layers(plain) == ([], 0)
    # Largest adapted layer: down_proj (128 in, 64 out) and gate/up (64 in, 128 out) -> max of i*i + 3*o*i.
    assert memory_estimate.shape_of(dora).dora_elements == max(128 * 128 + 3 * 64 * 128, 64 * 64 + 3 * 128 * 64)
    assert memory_estimate.shape_of(plain).dora_elements == 0
    setup = memory_estimate.Setup.from_config(config(tiny_model_dir, {"use_dora": True}))
    more = memory_estimate.estimate(memory_estimate.shape_of(dora), setup).workspace
    less = memory_estimate.estimate(memory_estimate.shape_of(plain), setup).workspace
    assert more - less == 2 * memory_estimate.shape_of(dora).dora_elements
    assert mfu.dora_flops([(128, 64)], 4) == 2 * 4 * 128 * (128 + 64) + 3 * 64 * 128
    counter = mfu.FlopCounter(1000, dora.config, None, mfu.dora_flops(layers, rank))
    counter.add([10])
    assert counter.flops == mfu.step_flops(1000, 2, 64, [10]) + mfu.dora_flops(layers, rank)
