"""The training step and its bookkeeping, shared by the Ray Train worker (qlora/worker.py) and the benchmarks:
optimizer and schedule, one micro-batch's forward and backward, the metrics window between reports, and
throughput by the clock."""
from __future__ import annotations

import gc
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from qlora import distributed, kernels, mfu, oom
from qlora.strategies import Strategy
from qlora.config import JobConfig


def make_optimizer(cfg: JobConfig, params):
    t, name = cfg.train, cfg.optimizer_to_use()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, momentum=0.9, weight_decay=t.weight_decay)
    import bitsandbytes as bnb  # CUDA optimizers; the config refuses them without scaling.use_gpu
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[name]
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def make_scheduler(cfg: JobConfig, optimizer, total_steps: int):
    from transformers import get_scheduler
    warmup = cfg.train.warmup_steps or math.ceil(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def forward_backward(model, inputs: dict, labels: torch.Tensor, hidden: Optional[kernels.HiddenStates],
                     task_loss: Callable, dtype: torch.dtype, strategy: Strategy, accum: int = 1,
                     sync: bool = True) -> torch.Tensor:
    """One micro-batch: the forward pass under the step's autocast, its mean loss (`task_loss(model, inputs,
    labels)` -> (sum, count), unless `hidden` computes the fused next-token loss), and the backward pass of
    that loss over `accum` micro-batches (the gradient all-reduce / reduce-scatter only when `sync`). Returns
    the loss (not synchronised: `.item()` it when needed)."""
    with strategy.gradient_sync(model, sync):
        with kernels.autocast(strategy.ctx.device, dtype):
            loss_sum, n = kernels.forward_loss(model, inputs, labels, hidden, task_loss)
        loss = loss_sum / n.clamp(min=1)
        strategy.backward(model, loss, accum)
    return loss.detach()


# What peak_memory_gib measures, written beside it in metrics.json.
PEAK_MEMORY_KIND = {"cuda": "torch.cuda.max_memory_allocated (tensors on the GPU; excludes the CUDA context and "
                            "allocator cache)",
                    "cpu": "max resident set size of the worker process (weights, activations, optimizer, plus "
                           "Python, torch and Ray overhead)"}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def out_of_memory(model, cfg: JobConfig, device: torch.device, step: int, tokens: int) -> oom.OutOfMemory:
    return oom.OutOfMemory(oom.describe(model, cfg, device, step, tokens))


@dataclass
class Window:
    """The steps since the last report: their loss, real (non-pad) tokens, batch slots and seconds."""
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    slots: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add_micro_batch(self, token_mask: torch.Tensor) -> int:
        real = int(token_mask.sum())
        self.tokens, self.slots = self.tokens + real, self.slots + token_mask.numel()
        return real

    def metrics(self, ctx: distributed.Context, flops: mfu.FlopCounter) -> dict:
        """loss, tokens_per_second, packing_efficiency (and mfu on GPUs) over all ranks: a collective."""
        elapsed = time.perf_counter() - self.start
        utilization = flops.mfu(elapsed)
        loss, tokens, slots, mfu_all = distributed.all_sum([self.loss / self.steps, self.tokens, self.slots,
                                                            utilization or 0.0], ctx)
        out = {"loss": loss / ctx.world_size, "tokens_per_second": tokens / elapsed,
               # Real (non-pad) tokens / batch slots: what packing or group_by_length save on padding.
               "packing_efficiency": tokens / max(slots, 1)}
        if utilization is not None:  # GPUs only: a CPU has no meaningful tensor-core peak
            out["mfu"] = mfu_all / ctx.world_size
        return out


@dataclass
class Clock:
    """Throughput by the wall clock, which is what a run costs: this rank's real tokens over the seconds of
    the training loop, reporting and checkpointing included, held-out evaluation left out (counted apart);
    also without the first step, which compiles under train.compile. The per-window tokens_per_second
    leaves out the time between windows (reports, checkpoints, evaluation)."""
    start: float = field(default_factory=time.perf_counter)
    first_step: int = 0  # the step the loop started at (a resumed run's)
    first_step_end: Optional[float] = None
    tokens: int = 0
    first_step_tokens: int = 0
    eval_seconds: float = 0.0  # evaluation inside the loop (eval_every), all after the first step
    report_seconds: float = 0.0  # inside ray.train.report (checkpoint uploads included)

    def step_done(self) -> None:
        if self.first_step_end is not None:
            return
        self.first_step_end, self.first_step_tokens = time.perf_counter(), self.tokens
        # Everything loaded and compiled so far lives to the end of the run: keep it out of the garbage
        # collector's full passes, which otherwise walk all of it (0.3-0.5 s once the model is loaded,
        # measured on CPU: a stall of that size at irregular steps).
        gc.collect()
        gc.freeze()

    def training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def metrics(self, ctx: distributed.Context) -> dict:
        """Clock throughput over all ranks (a collective), measured now."""
        now = time.perf_counter()
        tokens, first = distributed.all_sum([self.tokens, self.first_step_tokens], ctx)
        after_first = now - self.first_step_end - self.eval_seconds
        return {"clock_tokens_per_second": tokens / max(now - self.start - self.eval_seconds, 1e-9),
                "clock_tokens_per_second_after_first_step": (tokens - first) / after_first if after_first > 0 else 0.0,
                "first_step_seconds": self.first_step_end - self.start, "eval_seconds": self.eval_seconds,
                "report_seconds": self.report_seconds}
