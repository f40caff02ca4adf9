"""GPU out-of-memory: what was measured, what the step needed, what to change; and the halving rule.

An OOM in the first steps is a sizing problem, not a crash: the message says how much memory the GPU
has, how much the weights and optimizer state already hold, how big the failed micro-batch was, and
which settings trade memory for speed. With train.auto_batch_size the driver retries the run with half
the micro-batch and twice the gradient accumulation, so the global batch and the optimization stay the
same.
"""
from __future__ import annotations

import torch

from qlora.config import JobConfig
from qlora.errors import TrainingFailure

GIB = 2**30


class OutOfMemory(TrainingFailure):
    """The GPU ran out of memory during a training step (exit code 1, or a halved retry)."""


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def describe(model, cfg: JobConfig, device: torch.device, step: int, tokens_in_batch: int) -> str:
    """The OOM message: measured memory on `device`, the model's resident share, the failed batch size."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # AdamW keeps two fp32 moments per trainable parameter, plus the fp32 gradient.
    optimizer_state = trainable * 4 * 3 / GIB
    total = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else float("nan")
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    t = cfg.train
    return (f"GPU out of memory at step {step + 1} on {_device_name(device)}: {total:.1f} GiB total, {peak:.1f} GiB "
            f"allocated at the peak; the weights hold {weights:.2f} GiB and LoRA gradients + optimizer state about "
            f"{optimizer_state:.2f} GiB, so the activations of one micro-batch ({t.batch_size} examples, "
            f"{tokens_in_batch} tokens up to data.max_length={cfg.data.max_length}) needed more than the "
            f"{max(total - weights - optimizer_state, 0):.1f} GiB left. Lower train.batch_size (raise "
            f"train.gradient_accumulation to keep the global batch) or data.max_length, set "
            f"train.gradient_checkpointing=true{'' if t.gradient_checkpointing else ' (off now)'}, use more or larger "
            f"GPUs, or set train.auto_batch_size=true to halve the micro-batch automatically")


def halved(cfg: JobConfig) -> JobConfig | None:
    """The config with half the micro-batch and twice the accumulation (same global batch), or None at 1."""
    t = cfg.train
    if t.batch_size == 1:
        return None
    return cfg.with_changes({"train.batch_size": t.batch_size // 2,
                             "train.gradient_accumulation": t.gradient_accumulation * 2})


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
