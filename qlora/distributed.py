"""The strategy-free collectives: this worker's rank context and device, data shares, reductions, gathers,
who writes. How DDP, FSDP and DeepSpeed differ lives in qlora/strategies/.

Ray Train sets up the process group (gloo on CPU, NCCL on GPU) before the worker loop starts; outside
Ray (a single process) everything here degrades to world size 1. With sharded parameters (FSDP) every
forward pass is a collective, so every rank must run the same number of them, in evaluation and generation
too (`lockstep_share`, Context.sharded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qlora.errors import EnvironmentProblem


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    sharded: bool = False  # parameters sharded over the ranks (FSDP): forward passes are collectives
    local_rank: int = 0  # rank among this node's workers

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes adapters, checkpoints and MLflow records."""
        return self.rank == 0

    @property
    def writes_node_cache(self) -> bool:
        """One worker per node fills the node's caches (the quantized base: qlora/weights_cache.py)."""
        return self.local_rank == 0


def context(use_gpu: bool) -> Context:
    """Rank, world size and device of this process (Ray Train's, else a world of one); strategies.for_worker
    sets `sharded`."""
    try:
        import ray.train
        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    except Exception:  # not inside a Ray Train worker
        rank, world, local = 0, 1, 0
    if use_gpu:
        if not torch.cuda.is_available():
            raise EnvironmentProblem("scaling.use_gpu=true but this Ray worker sees no CUDA GPU",
                                     "run on GPU nodes, or set scaling.use_gpu=false")
        import ray.train.torch
        device = ray.train.torch.get_device() if world > 1 or dist.is_initialized() else torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Context(rank, world, device, local_rank=local)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) gathered whole on every rank; other tensors as they are. A collective for
    DTensors: every rank must call it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; other tensors as they are."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (its shard of DTensors)."""
    return sum(local(t).nbytes for t in tensors)


def frozen_gib(model: nn.Module) -> float:
    """GiB of the frozen base this rank holds: quantized weights, their scales, buffers (its shard under FSDP)."""
    return local_bytes([p for p in model.parameters() if not p.requires_grad] + list(model.buffers())) / 2**30


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` over all ranks' gradients (sharded gradients are reduced); returns the norm before."""
    return float(full(torch.nn.utils.clip_grad_norm_(params, max_norm)))


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


def lockstep_share(items: list, ctx: Context) -> tuple[list, int]:
    """(this rank's share, how many of it are real). With sharded parameters every rank must run the same
    forward passes, so shorter shares are padded with repeats of an item whose results the caller drops;
    otherwise the share of shard_exact."""
    mine = shard_exact(items, ctx)
    if not ctx.sharded or not items:
        return mine, len(mine)
    per_rank = -(-len(items) // ctx.world_size)
    return mine + [items[0]] * (per_rank - len(mine)), len(mine)


def gather_shards(items: list, ctx: Context) -> list:
    """The inverse of shard_exact: every rank's share back in the original order (all ranks get it)."""
    shares = per_rank(list(items), ctx)
    out = [None] * sum(len(s) for s in shares)
    for rank, share in enumerate(shares):
        out[rank::ctx.world_size] = share
    return out


def per_rank(value, ctx: Context) -> list:
    """Every rank's `value` (picklable), in rank order; a collective."""
    if ctx.world_size == 1:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(ctx: Context) -> None:
    """Every rank waits here for the others."""
    if ctx.world_size > 1:
        dist.barrier()


def all_sum(values: list[float], ctx: Context) -> list[float]:
    if ctx.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()
