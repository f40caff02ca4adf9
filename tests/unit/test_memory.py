"""The out-of-memory rule and message (the GPU path itself ran on an H100: benchmarks/gpu_oom.sh)."""
import torch

from qlora import oom
from qlora.config import JobConfig


def cfg(batch: int, accum: int) -> JobConfig:
    return JobConfig.model_validate({"data": {"path": "x.jsonl"},
                                     "train": {"batch_size": batch, "gradient_accumulation": accum}})


def test_halving_keeps_the_global_batch_and_stops_at_one():
    steps, c = [], cfg(8, 3)
    while c is not None:
        steps.append((c.train.batch_size, c.train.gradient_accumulation))
        c = oom.halved(c)
    assert steps == [(8, 3), (4, 6), (2, 12), (1, 24)]
    assert {b * a for b, a in steps} == {24}


def test_message_names_memory_batch_and_fixes():
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of fp32 weights, all trainable
    text = oom.describe(model, cfg(16, 1), torch.device("cpu"), step=0, tokens_in_batch=16 * 512)
    assert "out of memory at step 1" in text and "the weights hold 0.00 GiB" in text
    assert "16 examples, 8192 tokens" in text
    for fix in ("train.batch_size", "train.gradient_accumulation", "data.max_length",
                "train.gradient_checkpointing=true (off now)", "train.auto_batch_size=true"):
        assert fix in text
    assert oom.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not oom.is_oom(ValueError("shape mismatch"))
