"""Everything that knows about ranks: device choice, DDP / FSDP wrapping, data shares, reductions,
gathering sharded state, who writes.

Ray Train sets up the process group (gloo on CPU, NCCL on GPU) before the worker loop starts; outside
Ray (a single process) everything here degrades to world size 1.

Under DeepSpeed (scaling.strategy=deepspeed) a ZeRO engine replaces DDP: it takes the optimizer too
(`with_deepspeed`), runs the backward pass and applies the update (`backward`, `apply_update`), and keeps each
rank's partition of the optimizer state; checkpoints hold that state whole, in torch's format.

Under FSDP (scaling.strategy=fsdp) every forward pass is a collective: each decoder layer all-gathers its
weights from all ranks. So every rank must run the same number of forward passes, in evaluation and
generation too (`lockstep_share`), and full adapter / optimizer state exists only after a gather that all
ranks join (`full_trainable_state`, `optimizer_state`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qlora.errors import ConfigError, EnvironmentProblem
from qlora.modeling import decoder_layers


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    sharded: bool = False  # parameters sharded over the ranks (FSDP): forward passes are collectives
    deepspeed: bool = False  # a DeepSpeed ZeRO engine drives backward and update; optimizer state partitioned

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes adapters, checkpoints and MLflow records."""
        return self.rank == 0


def context(use_gpu: bool, strategy: str = "ddp") -> Context:
    try:
        import ray.train
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # not inside a Ray Train worker
        rank, world = 0, 1
    if use_gpu:
        if not torch.cuda.is_available():
            raise EnvironmentProblem("scaling.use_gpu=true but this Ray worker sees no CUDA GPU",
                                     "run on GPU nodes, or set scaling.use_gpu=false")
        import ray.train.torch
        device = ray.train.torch.get_device() if world > 1 or dist.is_initialized() else torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # One worker has nothing to shard or partition: plain training, as with ddp.
    return Context(rank, world, device, sharded=strategy == "fsdp" and world > 1,
                   deepspeed=strategy == "deepspeed" and world > 1)


def wrap(model: nn.Module, ctx: Context, strategy: str = "ddp", fused_loss: bool = False) -> nn.Module:
    """The model the training step calls. ddp: a DDP wrapper; only trainable (LoRA) parameters take part in
    the all-reduce. fsdp: FSDP2 in place, one unit per decoder layer, one each for an untied input embedding
    and output head (fp32 on a 4-bit base: gathered only while used, not for the whole step as the root's
    parameters are), and the root (norms, a classifier's head); LoRA weights shard with their layer, so
    gradients are reduce-scattered and optimizer states sharded too. With `fused_loss` the head stays in
    the root: the fused loss multiplies by its weight after the forward pass, which the root keeps gathered
    until the backward pass ends."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        if not ctx.sharded:  # one worker: nothing to shard with, FSDP would only add copies
            return model
        for layer in fsdp_layers(model):
            fully_shard(layer)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and head.weight is not embedding.weight:  # a tied pair must stay in one unit
            fully_shard(embedding)
            if not fused_loss:
                fully_shard(head)
        fully_shard(model)
        # peft's generate calls the inner model, which would bypass the root's hooks (they gather the root's
        # parameters and start the layers' prefetching).
        register_fsdp_forward_method(model, "generate")
        return model
    if ctx.world_size == 1 or strategy == "deepspeed":  # DeepSpeed wraps model and optimizer together
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def with_deepspeed(model: nn.Module, optimizer, ctx: Context, zero_stage: int, micro_batch: int, accum: int,
                   max_grad_norm: float, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """`model` inside a DeepSpeed ZeRO engine that owns `optimizer` (ctx.deepspeed; else `model` as it is).
    fp32 mode: the LoRA weights stay fp32 and the forward pass runs under autocast to `autocast_dtype` (the
    training step's, kernels.autocast_dtype), as on the other paths; DeepSpeed's bf16 mode would cast the
    whole module, the 4-bit layers included. The scheduler stays ours: it sets the learning rate in
    `optimizer`'s param groups, which ZeRO's step reads."""
    if not ctx.deepspeed:
        return model
    import os

    import deepspeed
    # DeepSpeed picks its device from LOCAL_RANK; Ray Train has already chosen ours.
    os.environ["LOCAL_RANK"] = str(ctx.device.index or 0)
    # One bucket as large as the LoRA weights: DeepSpeed's default (5e8 elements) would allocate 2 GB per
    # gradient buffer for a few million trainable parameters.
    bucket = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accum,
              "gradient_clipping": max_grad_norm,
              "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
              "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    if autocast_dtype is not None:
        # The engine's forward turns an outer autocast off unless its own config asks for it (measured: the
        # 8B step ran in fp32, 0.57x DDP's speed); no lower-precision modules: gradients are reduced in fp32.
        config["torch_autocast"] = {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch."),
                                    "lower_precision_safe_modules": []}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def fsdp_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers FSDP shards one by one; a ConfigError if the model has none."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"scaling.strategy=fsdp: {type(model).__name__} has no transformers decoder layer "
                          "(GradientCheckpointingLayer), so FSDP has no layers to shard one by one",
                          "use scaling.strategy=ddp for this model")
    return layers


def gradient_sync(model: nn.Module, ctx: Context, sync: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce / reduce-scatter unless `sync`
    (the last micro-batch of a gradient-accumulation step)."""
    if sync or ctx.world_size == 1 or ctx.deepspeed:  # DeepSpeed skips the reduction itself (and has no no_sync)
        return contextlib.nullcontext()
    return _fsdp_no_sync(model) if ctx.sharded else model.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def backward(model: nn.Module, loss: torch.Tensor, accum: int, ctx: Context) -> None:
    """One micro-batch's backward pass, `loss` averaged over the `accum` micro-batches of a step. A DeepSpeed
    engine also counts the micro-batch here, and after the last one clips, updates and zeroes the gradients."""
    if ctx.deepspeed:
        model.backward(loss)  # divides by gradient_accumulation_steps itself
        model.step()
    else:
        (loss / accum).backward()


def apply_update(model: nn.Module, optimizer, max_norm: float, ctx: Context) -> float:
    """Clip the step's gradients to `max_norm`, update, zero them; returns the norm before clipping."""
    if ctx.deepspeed:  # the update happened in the last micro-batch's backward()
        return float(model.get_global_grad_norm())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = clip_grad_norm(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) gathered whole on every rank; other tensors as they are. A collective for
    DTensors: every rank must call it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; other tensors as they are."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def resharded(model: nn.Module) -> nn.Module:
    """`model` with every FSDP unit holding only its shards, as the optimizer knows its parameters. After a
    no-grad forward (evaluation) the root unit keeps its gathered parameters (FSDP2 expects a backward to
    follow), and the module then holds other tensor objects than the optimizer does: state dicts keyed
    through the module would miss them (a classifier's head lives in the root unit)."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on the CPU, keyed as in model.state_dict() (what peft's
    save_pretrained filters the adapter from). Every rank must call it; only trainable weights are
    gathered, never the frozen 4-bit base."""
    return {name: full(p.detach()).cpu() for name, p in resharded(model).named_parameters() if p.requires_grad}


def optimizer_state(model: nn.Module, optimizer, ctx: Context) -> dict:
    """The optimizer's state dict with every shard gathered (every rank must call it under FSDP and
    DeepSpeed). `model` as the training step calls it (FSDP's module, or the DeepSpeed engine)."""
    if ctx.deepspeed:
        return _zero_optimizer_state(model, optimizer)
    if not ctx.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(resharded(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, ctx: Context) -> None:
    """The inverse of optimizer_state: each rank keeps its shard of the saved (whole) state."""
    if ctx.deepspeed:
        return _load_zero_optimizer_state(model, optimizer, state)
    if not ctx.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ZeRO partitions the optimizer state of one flat fp32 tensor per param group; DeepSpeed's tensor-fragment API
# (safe_get/set_full_optimizer_state) maps it to and from each parameter. Checkpoints keep torch's format
# (per-parameter state, integer keys in optimizer order), the same as a DDP run writes.

def _zero_optimizer_state(engine, optimizer) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state
    params = [p for p in engine.module.parameters() if p.requires_grad]  # the optimizer's order (make_optimizer)
    flat_state = next(iter(optimizer.state.values()), None)
    state = {}
    if flat_state is not None:  # none before the first update
        moments = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.dim() == 1]
        for i, p in enumerate(params):
            state[i] = {k: v.clone() for k, v in flat_state.items() if k not in moments}  # "step"
            state[i].update({k: safe_get_full_optimizer_state(p, k).cpu() for k in moments})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if len(groups) != 1:
        raise NotImplementedError("one optimizer param group is supported under DeepSpeed")
    groups[0]["params"] = list(range(len(params)))
    return {"state": state, "param_groups": groups}


def _load_zero_optimizer_state(engine, optimizer, saved: dict) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state
    params = [p for p in engine.module.parameters() if p.requires_grad]
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    if not saved["state"]:
        return
    example = saved["state"][0]
    moments = [k for k, v in example.items() if torch.is_tensor(v) and v.dim() > 0]
    # The state of this rank's flat partition exists only after a first update: create it, have ZeRO link each
    # parameter's fragment to it (a private hook: the public setter needs the link), then fill the fragments.
    for flat in (p for g in optimizer.param_groups for p in g["params"]):
        optimizer.state[flat] = {k: torch.zeros_like(flat) if k in moments else v.clone() for k, v in example.items()}
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(params):
        for k in moments:
            safe_set_full_optimizer_state(p, saved["state"][i][k].to(p.device), k)


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (its shard of DTensors)."""
    return sum(local(t).nbytes for t in tensors)


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


def all_sum(values: list[float], ctx: Context) -> list[float]:
    if ctx.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()
