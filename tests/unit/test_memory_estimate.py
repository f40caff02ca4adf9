"""The per-worker GPU memory estimate of --dry-run: its arithmetic on plain numbers, the counts it reads from a
model, and the line and JSON key the dry run prints. Its agreement with measured GPU peaks is in
benchmarks/RESULTS.md (benchmarks/memory_estimate_check.py)."""
import contextlib
import io
import json
from dataclasses import replace

import pytest
import yaml

from qlora import memory_estimate as me
from qlora.kernels import CHUNK_TOKENS

from conftest import ROOT

# Llama-3-8B's counts (LoRA r=16 on all linear layers), as shape_of reads them from the meta model.
SHAPE = me.ModelShape(quantized_params=6_979_321_856, quantized_rows=1_376_256, other_params=1_050_939_392,
                      trainable_params=41_943_040, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      head_rows=128256)
SETUP = me.Setup(bits=4, double_quant=True, optimizer="adamw", batch_size=4, max_length=2048,
                 gradient_checkpointing=True, checkpointed_fraction=1.0, loss="full", fused_layers=False, workers=1,
                 eval_batch_size=16)
T = 4 * 2048


def test_weight_bytes_per_quantization():
    shape = replace(SHAPE, quantized_params=64 * 256 * 4, quantized_rows=100, other_params=1000)
    # 4-bit: half a byte per weight, a 1-byte absmax per 64 weights, an fp32 per 256 absmax (double quant).
    assert me.weight_bytes(shape, 4, True) == 32768 + 1024 + 4 * 4 + 4 * 1000
    assert me.weight_bytes(shape, 4, False) == 32768 + 4 * 1024 + 4 * 1000  # fp32 absmax per block
    assert me.weight_bytes(shape, 8, True) == 65536 + 4 * 100 + 4 * 1000  # int8 + an fp32 scale per row
    assert me.weight_bytes(shape, 16, True) == 2 * (65536 + 1000)  # everything bf16


@pytest.mark.parametrize("optimizer, per_param", [("adamw", 16), ("paged_adamw_32bit", 16), ("adamw_8bit", 10),
                                                  ("paged_adamw_8bit", 10), ("sgd", 12)])
def test_lora_state_bytes_per_optimizer(optimizer, per_param):
    est = me.estimate(SHAPE, replace(SETUP, optimizer=optimizer))
    assert est.lora_and_optimizer == SHAPE.trainable_params * per_param
    # Several DDP workers: each also keeps its gradients in fp32 all-reduce buckets.
    several = me.estimate(SHAPE, replace(SETUP, optimizer=optimizer, workers=4))
    assert several.lora_and_optimizer == SHAPE.trainable_params * (per_param + 4)
    assert several.weights == est.weights  # DDP replicates the model: no smaller per worker


def test_checkpointed_fraction_trades_recompute_for_kept_layers():
    full = me.estimate(SHAPE, SETUP)
    half = me.estimate(SHAPE, replace(SETUP, checkpointed_fraction=0.5))
    layer = me.layer_bytes(SHAPE, T, fused=False)
    residual = T * SHAPE.hidden_size * 4  # a checkpointed layer keeps its fp32 input only
    assert half.activations - full.activations == 16 * (layer - residual)
    # Fully checkpointed: 32 inputs + the final norm's input; one layer is recomputed in the backward.
    assert full.activations == 33 * residual
    assert full.workspace - me.estimate(SHAPE, replace(SETUP, gradient_checkpointing=False)).workspace == layer
    # A 16-bit base keeps a bf16 residual stream.
    assert me.estimate(SHAPE, replace(SETUP, bits=16)).activations == 33 * residual // 2


def test_compile_memory_budget_keeps_part_of_each_uncheckpointed_layer():
    layer = me.layer_bytes(SHAPE, T, fused=True)
    compiled = replace(SETUP, fused_layers=True, gradient_checkpointing=False)
    full = me.estimate(SHAPE, compiled)
    residual = T * SHAPE.hidden_size * 4
    assert full.activations == residual + SHAPE.num_layers * layer
    assert me.estimate(SHAPE, replace(compiled, compile_memory_budget=1.0)) == full  # the compiler's default
    low = me.estimate(SHAPE, replace(compiled, compile_memory_budget=0.2))
    kept = me.KEPT_AT_ZERO_BUDGET + 0.2 * me.KEPT_PER_BUDGET
    assert low.activations == residual + SHAPE.num_layers * int(kept * layer)
    assert low.workspace == full.workspace  # no layer is recomputed whole
    # Checkpointed layers keep only their input whatever the budget.
    half = replace(compiled, gradient_checkpointing=True, checkpointed_fraction=0.5, compile_memory_budget=0.2)
    kept_layers = SHAPE.num_layers // 2
    assert me.estimate(SHAPE, half).activations == (kept_layers + 1) * residual + kept_layers * int(kept * layer)


def test_fused_loss_removes_the_tokens_by_vocabulary_term():
    full, chunked, liger = (me.estimate(SHAPE, replace(SETUP, loss=loss)) for loss in ("full", "chunked", "liger"))
    assert full.logits - chunked.logits == 12 * (T - CHUNK_TOKENS) * SHAPE.head_rows
    head_copy = 2 * SHAPE.head_rows * SHAPE.hidden_size  # autocast's bf16 copy of the fp32 head
    assert liger.logits == head_copy and chunked.logits == 12 * CHUNK_TOKENS * SHAPE.head_rows + head_copy
    assert full.total - chunked.total == full.logits - chunked.logits  # the loss is the peak here


def test_total_counts_the_larger_of_loss_and_layer_backward():
    """The loss and the layers' backward run one after the other: their temporaries never add up."""
    full, liger = me.estimate(SHAPE, SETUP), me.estimate(SHAPE, replace(SETUP, loss="liger"))
    assert full.logits > full.workspace and liger.workspace > liger.logits  # each case has the other peak
    for est in (full, liger):
        assert est.total == est.weights + est.lora_and_optimizer + est.activations + max(est.logits, est.workspace)


def test_fsdp_divides_weights_and_lora_states_and_adds_the_gathered_layers():
    ddp2 = replace(SETUP, workers=2)
    ddp, fsdp = me.estimate(SHAPE, ddp2), me.estimate(SHAPE, replace(ddp2, strategy="fsdp"))
    assert fsdp.weights == ddp.weights // 2 and fsdp.activations == ddp.activations and fsdp.logits == ddp.logits
    # DDP's gradient buckets (4 B per trainable param) do not exist under FSDP; the rest halves.
    assert fsdp.lora_and_optimizer == (ddp.lora_and_optimizer - 4 * SHAPE.trainable_params) // 2
    per_layer = (me.quantized_bytes(SHAPE, 4, True) + 4 * SHAPE.trainable_params) // SHAPE.num_layers
    assert fsdp.gathered == 2 * per_layer + 4 * SHAPE.head_rows * SHAPE.hidden_size and ddp.gathered == 0
    assert fsdp.total == ddp.total - (ddp.weights - fsdp.weights) - (ddp.lora_and_optimizer - fsdp.lora_and_optimizer) \
        + fsdp.gathered
    # One worker has nothing to shard with: FSDP there is DDP's figure.
    assert me.estimate(SHAPE, replace(SETUP, strategy="fsdp")) == me.estimate(SHAPE, SETUP)


def test_deepspeed_divides_only_the_partitioned_lora_states():
    """ZeRO keeps the whole model and LoRA weights on every worker; ZeRO-2 partitions the fp32 master copy,
    the reduced gradients and the optimizer state (AdamW: 4 + 4 + 8 B per trainable param) over the workers,
    beside the weight, its gradient and one reduce bucket (4 B each)."""
    ddp2 = replace(SETUP, workers=2)
    ddp, zero2 = me.estimate(SHAPE, ddp2), me.estimate(SHAPE, replace(ddp2, strategy="deepspeed"))
    assert zero2.weights == ddp.weights and zero2.gathered == 0 and zero2.activations == ddp.activations
    assert zero2.lora_and_optimizer == SHAPE.trainable_params * (12 + 16 // 2)
    zero1 = me.estimate(SHAPE, replace(ddp2, strategy="deepspeed", zero_stage=1))
    assert zero1.lora_and_optimizer == SHAPE.trainable_params * (16 + 12 // 2)
    four = me.estimate(SHAPE, replace(ddp2, strategy="deepspeed", workers=4))
    assert four.lora_and_optimizer == SHAPE.trainable_params * (12 + 16 // 4) < zero2.lora_and_optimizer
    # One worker: no engine (the worker trains as ddp), so DDP's figure.
    assert me.estimate(SHAPE, replace(SETUP, strategy="deepspeed")) == me.estimate(SHAPE, SETUP)


def test_estimate_of_the_8b_benchmark_row():
    """The Liger row of benchmarks/RESULTS.md (8B, 4 x 2048, NF4, full checkpointing): 15.26 GiB measured."""
    est = me.estimate(SHAPE, replace(SETUP, loss="liger", fused_layers=True))
    assert est.total / me.GIB == pytest.approx(15.26, rel=0.15)


def tiny_llama(tie: bool, meta: bool, task: str = "causal_lm"):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from qlora import modeling
    from qlora.config import LoraSection
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, num_labels=3)
    cls = AutoModelForSequenceClassification if task == "sequence_classification" else AutoModelForCausalLM
    with init_empty_weights() if meta else contextlib.nullcontext():
        model = cls.from_config(config)
    return modeling.attach_lora(model, LoraSection(r=8), task)


def test_shape_of_counts_what_bitsandbytes_quantizes():
    shape = me.shape_of(tiny_llama(tie=True, meta=True))
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q, o; k, v (2 kv heads of 16); gate, up, down
    assert shape.quantized_params == 2 * per_layer
    assert shape.quantized_rows == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert shape.other_params == 1000 * 64 + 5 * 64  # one tied embedding; two norms per layer + the final one
    assert shape.trainable_params == 2 * 8 * (128 + 96 + 96 + 128 + 192 * 3)  # r * (in + out) per module
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.head_rows) == (64, 128, 2, 1000)
    # Loaded for real the head is the embedding; on the meta device it is left untied: the same counts.
    assert me.shape_of(tiny_llama(tie=True, meta=False)) == shape
    untied = me.shape_of(tiny_llama(tie=False, meta=True))
    assert untied.other_params == shape.other_params + 1000 * 64
    classifier = me.shape_of(tiny_llama(tie=False, meta=True, task="sequence_classification"))
    assert classifier.head_rows == 3 and classifier.trainable_params == shape.trainable_params + 3 * 64


def test_dry_run_prints_the_estimate(tmp_path, monkeypatch, tiny_model_dir):
    from ray_jobs.train import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(ROOT / "data" / "people_json.jsonl"), "max_samples": 16, "eval_max_samples": 4,
                 "max_length": 128},
        "train": {"gradient_checkpointing": True, "fused_cross_entropy": True}, "evaluation": {"generate": False}}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--config", "job.yaml", "--dry-run"]) == 0
    text = out.getvalue()
    line = next(ln for ln in text.splitlines() if ln.startswith("GPU memory per worker, estimated: "))
    assert float(line.split(": ")[1].split(" GiB")[0]) > 0 and "4 x 128 tokens" in line
    assert "same accounting, as a GPU estimate" in text  # the config trains on CPU
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["gpu_memory_estimate_gib"] > 0 and summary["gpu_memory_evaluation_gib"] > 0
    # The same job sharded over 2 workers: the estimate says so and counts the gathered layers.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--config", "job.yaml", "--dry-run", "--set", "scaling.strategy=fsdp",
                     "--set", "scaling.num_workers=2"]) == 0
    text = out.getvalue()
    assert "(FSDP over 2 workers: each holds 1/2 of the weights and LoRA states)" in text
    assert "layers gathered whole" in text
    assert json.loads(text.strip().splitlines()[-1])["gpu_memory_estimate_gib"] != summary["gpu_memory_estimate_gib"]
