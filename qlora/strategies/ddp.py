"""scaling.strategy=ddp: every worker holds the whole 4-bit model; only the trainable (LoRA) gradients are
all-reduced, once per optimizer step."""
from __future__ import annotations

from torch import nn

from qlora.strategies.base import MakeOptimizer, Strategy, optimizer_params


class DDP(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, autocast_dtype=None):
        optimizer = make_optimizer(optimizer_params(model, self.cfg))
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), optimizer

    def gradient_sync(self, wrapped: nn.Module, sync: bool):
        return super().gradient_sync(wrapped, sync) if sync else wrapped.no_sync()
