"""The interface every distributed strategy implements, and its one-process form.

A strategy is what differs between DDP, FSDP and DeepSpeed in training: how the model (and its optimizer)
is wrapped, how one micro-batch's backward pass and a step's update run, and how whole adapter and optimizer
state is read from and written into the ranks. Everything else (batches, losses, evaluation, checkpoints) is
strategy-free and asks the strategy only through these methods. One worker has nothing to shard or
partition: it trains with this base class, whatever scaling.strategy says.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from qlora.config import JobConfig
from qlora.distributed import Context, clip_grad_norm

MakeOptimizer = Callable[[list], torch.optim.Optimizer]  # trainable parameters (or param groups) -> optimizer


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA (and a classifier head's) parameters, in the order every strategy hands them to the optimizer:
    DeepSpeed's state mapping relies on that order."""
    return [p for p in model.parameters() if p.requires_grad]


class _ParamGroups(list):
    """The param groups peft's create_loraplus_optimizer hands its optimizer class, kept as they are (empty
    groups dropped), for our own optimizer: peft decides which parameters are LoRA+'s faster B group."""

    def __init__(self, groups, **defaults):
        super().__init__(g for g in groups if g["params"])


def optimizer_params(model: nn.Module, cfg: JobConfig) -> list:
    """What the optimizer trains: trainable_parameters, or with train.loraplus_lr_ratio two groups, the B
    matrices (and 1-d vectors) at learning_rate x the ratio. The scheduler scales each group's own rate."""
    ratio = cfg.train.loraplus_lr_ratio
    if ratio is None:
        return trainable_parameters(model)
    from peft.optimizers import create_loraplus_optimizer
    return create_loraplus_optimizer(model, _ParamGroups, lr=cfg.train.learning_rate, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=cfg.train.weight_decay)


class Strategy:
    name = "single"
    # Every forward pass is a collective (parameters sharded over the ranks): every rank must run the same
    # number of them, in evaluation and generation too (distributed.lockstep_share).
    lockstep = False

    def __init__(self, ctx: Context, cfg: JobConfig):
        self.ctx, self.cfg = ctx, cfg

    @classmethod
    def check_environment(cls, cfg: JobConfig) -> None:
        """Refusals about this machine (a missing engine), raised before anything loads."""

    @classmethod
    def check_model(cls, cfg: JobConfig, lora_model: nn.Module) -> None:
        """Refusals about the (meta-device) model, raised before Ray starts."""

    @staticmethod
    def prepare_base(model: nn.Module, dtype: torch.dtype) -> None:
        """Called while the base loads, after its weights are quantized and before k-bit preparation."""

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer,
             autocast_dtype: torch.dtype | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(what the training step calls, the optimizer of the trainable parameters). `autocast_dtype`: the
        step's autocast (kernels.autocast_dtype), for engines that run the forward pass themselves."""
        return model, make_optimizer(optimizer_params(model, self.cfg))

    def gradient_sync(self, wrapped: nn.Module, sync: bool):
        """Context for one micro-batch's backward: reduce gradients over the ranks only when `sync` (the last
        micro-batch of a gradient-accumulation step)."""
        return contextlib.nullcontext()

    def backward(self, wrapped: nn.Module, loss: torch.Tensor, accum: int) -> None:
        """One micro-batch's backward pass, `loss` averaged over the step's `accum` micro-batches."""
        (loss / accum).backward()

    def apply_update(self, wrapped: nn.Module, optimizer, max_norm: float) -> float:
        """Clip the step's gradients to `max_norm`, update, zero them; returns the norm before clipping."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = clip_grad_norm(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every trainable weight whole (for the adapter file) when the ranks hold only parts of them, else None:
        rank 0's own model has them. A collective where parts must be gathered: every rank calls it."""
        return None

    def optimizer_state(self, wrapped: nn.Module, optimizer) -> dict:
        """The whole optimizer state, in torch's format (every rank calls it; partitions are gathered)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, wrapped: nn.Module, optimizer, state: dict) -> None:
        """The inverse of optimizer_state: each rank keeps its part of the saved (whole) state."""
        optimizer.load_state_dict(state)
