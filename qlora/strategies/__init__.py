"""Distributed strategies behind one interface (base.Strategy), picked by scaling.strategy: the only place that
knows how DDP, FSDP and DeepSpeed differ in training. Optional engines (deepspeed) are imported inside their
strategy's methods, so the package imports without them."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from qlora.config import JobConfig
from qlora.distributed import context
from qlora.strategies.base import Strategy
from qlora.strategies.ddp import DDP
from qlora.strategies.deepspeed import DeepSpeed
from qlora.strategies.fsdp import FSDP

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}


def check_environment(cfg: JobConfig) -> None:
    """The strategy's refusals about this machine (the schema has those about the config)."""
    STRATEGIES[cfg.scaling.strategy].check_environment(cfg)


def check_model(cfg: JobConfig, lora_model: nn.Module) -> None:
    """The strategy's refusals about the (meta-device) model."""
    STRATEGIES[cfg.scaling.strategy].check_model(cfg, lora_model)


def for_worker(cfg: JobConfig) -> Strategy:
    """This Ray Train worker's strategy, with its rank context. One worker has nothing to shard or partition:
    it trains in one process (base.Strategy), as every strategy would there."""
    ctx = context(cfg.scaling.use_gpu)
    cls = STRATEGIES[cfg.scaling.strategy] if ctx.world_size > 1 else Strategy
    return cls(replace(ctx, sharded=cls.lockstep), cfg)


__all__ = ["DDP", "DeepSpeed", "FSDP", "STRATEGIES", "Strategy", "check_environment", "check_model", "for_worker"]
