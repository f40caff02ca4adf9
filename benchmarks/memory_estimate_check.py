"""The --dry-run memory estimate (qlora/memory_estimate.py) against the peaks measured on an H100 and an H200.

Builds the two benchmark shapes on the meta device (no weights, CPU, seconds), attaches LoRA as the job does,
and prints one table row per measured peak of benchmarks/RESULTS.md (torch.cuda.max_memory_allocated of
benchmarks/speed.py: NF4 + double quant, LoRA r=16 alpha 32 dropout 0.05 on all linear layers, AdamW,
batch 4 x 2048 tokens, gradient checkpointing, bf16 autocast; each row's levers as named).

    PYTHONPATH=. python benchmarks/memory_estimate_check.py
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qlora import memory_estimate, modeling
from qlora.config import JobConfig, LoraSection

SHAPES = {  # the random-weight models of the GPU benchmarks (../shared/gpu/peer_baseline.py)
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # benchmarks/make_random_llama.py: the 1B shape with SmolLM2's vocabulary (gpu_ray_overhead.sh)
    "1B-v49k": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True),
}
FUSED = {"fused_cross_entropy": True}
LIGER = {"fused_cross_entropy": True, "kernels": "liger"}
COMPILED = {**LIGER, "compile": True}


@dataclass
class Row:
    shape: str
    name: str
    measured_gib: float | None  # None: the run went out of memory on the 80 GiB H100
    train: dict = field(default_factory=dict)
    batch_size: int = 4
    fitted: bool = False  # one of the rows C_HIDDEN and C_MLP, or the KEPT_* constants, were fitted to


ROWS = [
    Row("8B", "autocast", 24.80),
    Row("8B", "+ fused CE (chunked torch)", 19.19, FUSED),
    Row("8B", "+ Liger", 15.26, LIGER, fitted=True),
    Row("8B", "+ checkpointed_fraction 0.75", 31.68, {**LIGER, "checkpointed_fraction": 0.75}, fitted=True),
    Row("8B", "+ checkpointed_fraction 0.5", 46.63, {**LIGER, "checkpointed_fraction": 0.5}),
    Row("8B", "+ checkpointed_fraction 0.25", 63.02, {**LIGER, "checkpointed_fraction": 0.25}),
    Row("8B", "+ batch 8 (fraction 0.25)", None, {**LIGER, "checkpointed_fraction": 0.25}, batch_size=8),
    Row("8B", "Liger + checkpointed_fraction 0.85", 25.52, {**LIGER, "checkpointed_fraction": 0.85}),
    Row("8B", "Liger + compile", 15.05, {**LIGER, "compile": True}),
    Row("8B", "Liger + compile + fraction 0.85", 25.93, {**LIGER, "compile": True, "checkpointed_fraction": 0.85}),
    Row("8B", "Liger + packed alpaca rows", 15.41, LIGER),
    Row("8B", "Liger + packed alpaca rows + compile", 15.47, {**LIGER, "compile": True}),
    Row("1B", "autocast", 14.97),
    Row("1B", "+ fused CE (chunked torch)", 9.23, FUSED),
    Row("1B", "+ Liger", 4.48, LIGER, fitted=True),
    Row("1B", "+ checkpointed_fraction 0.75", 8.93, {**LIGER, "checkpointed_fraction": 0.75}, fitted=True),
    Row("1B", "+ checkpointed_fraction 0.5", 12.52, {**LIGER, "checkpointed_fraction": 0.5}),
    Row("1B", "+ checkpointed_fraction 0.25", 16.97, {**LIGER, "checkpointed_fraction": 0.25}),
    Row("1B", "+ batch 8 (fraction 0.25)", 31.89, {**LIGER, "checkpointed_fraction": 0.25}, batch_size=8),
    # Measured after the estimate was written (H200, 2026-11-29, gpu_ray_overhead.sh): out of sample.
    Row("1B-v49k", "Liger, packed alpaca rows, no Ray (speed.py)", 3.98, LIGER),
    Row("1B-v49k", "Liger, packed alpaca rows, the ray job submit'ed Ray Train job", 3.93, LIGER),
    # H200, 2026-11-29 (gpu_speed_h200.sh PART=checkpointing and PART=budget): compiled layers (no Liger layer kernels
    # under compile),
    # Liger's fused loss; the budget rows without whole-layer checkpointing.
    Row("8B", "compile", 15.30, COMPILED),
    Row("8B", "compile + checkpointed_fraction 0.85", 25.24, {**COMPILED, "checkpointed_fraction": 0.85}),
    Row("8B", "compile + checkpointed_fraction 0.7", 35.19, {**COMPILED, "checkpointed_fraction": 0.7}),
    Row("8B", "compile, no checkpointing", 77.17, {**COMPILED, "gradient_checkpointing": False}),
    *[Row("8B", f"compile, compile_memory_budget {b}", gib, {**COMPILED, "gradient_checkpointing": False,
                                                             "compile_memory_budget": b}, fitted=True)
      for b, gib in ((0.2, 26.52), (0.3, 33.11), (0.4, 33.11), (0.5, 39.89), (0.6, 46.68))],
]
LORA = LoraSection(r=16, alpha=32, dropout=0.05, target_modules="all-linear")


def meta_shape(dims: dict) -> memory_estimate.ModelShape:
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**dims))
    return memory_estimate.shape_of(modeling.attach_lora(model, LORA))


def setup(row: Row) -> memory_estimate.Setup:
    cfg = JobConfig.model_validate({
        "data": {"path": "unused.jsonl", "max_length": 2048}, "lora": LORA.model_dump(),
        "train": {"batch_size": row.batch_size, "gradient_checkpointing": True, **row.train},
        "scaling": {"use_gpu": True}})
    return memory_estimate.Setup.from_config(cfg)


def main() -> None:
    shapes = {name: meta_shape(dims) for name, dims in SHAPES.items()}
    print("| shape | run | measured GiB | estimated GiB | error | weights | LoRA + optimizer | activations | loss "
          "| layer backward |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    errors = []
    for row in ROWS:
        est = memory_estimate.estimate(shapes[row.shape], setup(row))
        terms = " | ".join(f"{getattr(est, t) / memory_estimate.GIB:.2f}"
                           for t in ("weights", "lora_and_optimizer", "activations", "logits", "workspace"))
        total = est.total / memory_estimate.GIB
        name = row.name + (" (fitted)" if row.fitted else "")
        if row.measured_gib is None:
            print(f"| {row.shape} | {name} | OOM (> 79.2) | {total:.2f} | - | {terms} |")
            continue
        error = (total - row.measured_gib) / row.measured_gib
        errors.append(abs(error))
        print(f"| {row.shape} | {name} | {row.measured_gib:.2f} | {total:.2f} | {error:+.1%} | {terms} |")
    print(f"\nlargest error: {max(errors):.1%} over {len(errors)} measured rows")


if __name__ == "__main__":
    main()
