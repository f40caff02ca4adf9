"""Everything that knows about ranks: device choice, DDP wrapping, sharding, reductions, who writes.

Ray Train sets up the process group (gloo on CPU, NCCL on GPU) before the worker loop starts; outside
Ray (a single process) everything here degrades to world size 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes adapters, checkpoints and MLflow records."""
        return self.rank == 0


def context(use_gpu: bool) -> Context:
    try:
        import ray.train
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # not inside a Ray Train worker
        rank, world = 0, 1
    if use_gpu:
        if not torch.cuda.is_available():
            from qlora.errors import EnvironmentProblem
            raise EnvironmentProblem("scaling.use_gpu=true but this Ray worker sees no CUDA GPU",
                                     "run on GPU nodes, or set scaling.use_gpu=false")
        import ray.train.torch
        device = ray.train.torch.get_device() if world > 1 or dist.is_initialized() else torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Context(rank, world, device)


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DDP over the LoRA model; only trainable (LoRA) parameters take part in the all-reduce."""
    if ctx.world_size == 1:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(indices: list[int], ctx: Context) -> list[int]:
    """This rank's share; every rank gets the same count (wrapping around) so DDP steps stay in lockstep."""
    if ctx.world_size == 1:
        return indices
    per_rank = -(-len(indices) // ctx.world_size)
    padded = (indices * (ctx.world_size * per_rank // max(1, len(indices)) + 1))[:per_rank * ctx.world_size]
    return padded[ctx.rank::ctx.world_size]


def shard_exact(items: list, ctx: Context) -> list:
    """This rank's share without padding (evaluation: every item counted once; sums are reduced)."""
    return items[ctx.rank::ctx.world_size]


def gather_shards(items: list, ctx: Context) -> list:
    """The inverse of shard_exact: every rank's share back in the original order (all ranks get it)."""
    if ctx.world_size == 1:
        return list(items)
    shares = [None] * ctx.world_size
    dist.all_gather_object(shares, list(items))
    out = [None] * sum(len(s) for s in shares)
    for rank, share in enumerate(shares):
        out[rank::ctx.world_size] = share
    return out


def all_sum(values: list[float], ctx: Context) -> list[float]:
    if ctx.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()
