"""scaling.strategy=deepspeed: a DeepSpeed ZeRO engine replaces DDP. Every worker holds the whole 4-bit model;
the engine takes the optimizer too, runs the backward pass and applies the update, and keeps each rank's
partition of the optimizer state (and with ZeRO-2 of the gradients). Checkpoints hold that state whole, in
torch's format (per-parameter state, integer keys in optimizer order), the same as a DDP run writes."""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from qlora.config import JobConfig
from qlora.errors import EnvironmentProblem
from qlora.strategies.base import MakeOptimizer, Strategy, trainable_parameters


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory communication op when the engine starts. The op
    serves only inference_all_reduce, which training never calls, and building it costs minutes of CPU on every
    fresh machine; a worker killed while building it (a failure, or the recovery test) leaves torch's build lock
    file behind, and every later start then waits on that lock forever (seen in CI). DeepSpeed keeps its op
    compatibility table as an editable module dict, which it reads before building."""
    import deepspeed.ops
    if "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeed(Strategy):
    name = "deepspeed"

    @classmethod
    def check_environment(cls, cfg: JobConfig) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise EnvironmentProblem("scaling.strategy=deepspeed but the deepspeed package is not installed here",
                                     "pip install 'qlora-ray[deepspeed]' on the driver and every worker node, or "
                                     "set scaling.strategy=ddp (or fsdp)")

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, autocast_dtype: torch.dtype | None = None):
        """`model` inside a ZeRO engine that owns its optimizer. fp32 mode: the LoRA weights stay fp32 and the
        forward pass runs under autocast to `autocast_dtype`, as on the other paths; DeepSpeed's bf16 mode would
        cast the whole module, the 4-bit layers included. The scheduler stays ours: it sets the learning rate in
        the optimizer's param groups, which ZeRO's step reads."""
        import deepspeed
        optimizer = make_optimizer(trainable_parameters(model))
        t = self.cfg.train
        # DeepSpeed picks its device from LOCAL_RANK; Ray Train has already chosen ours.
        os.environ["LOCAL_RANK"] = str(self.ctx.device.index or 0)
        # One bucket as large as the LoRA weights: DeepSpeed's default (5e8 elements) would allocate 2 GB per
        # gradient buffer for a few million trainable parameters.
        bucket = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        # This worker's share of the step's global micro-batches (more on fewer workers: the global batch stays).
        accumulation = self.cfg.accumulation_on(self.ctx.world_size)
        config = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": accumulation,
                  "gradient_clipping": t.max_grad_norm, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
                  "zero_optimization": {"stage": self.cfg.scaling.zero_stage, "reduce_bucket_size": bucket,
                                        "allgather_bucket_size": bucket}}
        if autocast_dtype is not None:
            # The engine's forward turns an outer autocast off unless its own config asks for it (measured: the
            # 8B step ran in fp32, 0.57x DDP's speed); no lower-precision modules: gradients are reduced in fp32.
            config["torch_autocast"] = {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch."),
                                        "lower_precision_safe_modules": []}
        skip_shared_memory_op()
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
        return engine, optimizer

    def gradient_sync(self, wrapped: nn.Module, sync: bool):
        return super().gradient_sync(wrapped, True)  # the engine skips the reduction itself (and has no no_sync)

    def backward(self, wrapped: nn.Module, loss: torch.Tensor, accum: int) -> None:
        """The engine divides by gradient_accumulation_steps itself, counts the micro-batch, and after the
        step's last one clips, updates and zeroes the gradients."""
        wrapped.backward(loss)
        wrapped.step()

    def apply_update(self, wrapped: nn.Module, optimizer, max_norm: float) -> float:
        return float(wrapped.get_global_grad_norm())  # the update happened in the last micro-batch's backward

    # ZeRO partitions the optimizer state of one flat fp32 tensor per param group; DeepSpeed's tensor-fragment
    # API (safe_get/set_full_optimizer_state) maps it to and from each parameter.

    def optimizer_state(self, wrapped: nn.Module, optimizer) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state
        params = trainable_parameters(wrapped.module)  # the optimizer's order
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

    def load_optimizer_state(self, wrapped: nn.Module, optimizer, saved: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state
        params = trainable_parameters(wrapped.module)
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        if not saved["state"]:
            return
        example = saved["state"][0]
        moments = [k for k, v in example.items() if torch.is_tensor(v) and v.dim() > 0]
        # The state of this rank's flat partition exists only after a first update: create it, have ZeRO link
        # each parameter's fragment to it (a private hook: the public setter needs the link), then fill them.
        for flat in (p for g in optimizer.param_groups for p in g["params"]):
            optimizer.state[flat] = {k: torch.zeros_like(flat) if k in moments else v.clone()
                                     for k, v in example.items()}
        wrapped.optimizer._hp_optimizer_states_linked = False
        wrapped.optimizer._lazy_init_hp_params_optimizer_state()
        for i, p in enumerate(params):
            for k in moments:
                safe_set_full_optimizer_state(p, saved["state"][i][k].to(p.device), k)
