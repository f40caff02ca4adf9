"""scaling.strategy=fsdp: FSDP2 shards the 4-bit base over the workers, one unit per decoder layer, so a base
that fits no single GPU trains. Every forward pass is then a collective (each layer all-gathers its weights
from all ranks), and whole adapter / optimizer state exists only after a gather that every rank joins."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from qlora.config import JobConfig
from qlora.distributed import full
from qlora.errors import ConfigError
from qlora.modeling import decoder_layers
from qlora.strategies.base import MakeOptimizer, Strategy, optimizer_params


class FSDP(Strategy):
    name = "fsdp"
    lockstep = True

    @classmethod
    def check_model(cls, cfg: JobConfig, lora_model: nn.Module) -> None:
        layers_to_shard(lora_model)

    @staticmethod
    def prepare_base(model: nn.Module, dtype: torch.dtype) -> None:
        store_4bit_as(model, dtype)

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer, autocast_dtype=None):
        """FSDP2 in place: a unit per decoder layer, one each for an untied input embedding and output head
        (fp32 on a 4-bit base: gathered only while used, not for the whole step as the root's parameters are),
        and the root (norms, a classifier's head). LoRA weights shard with their layer, so gradients are
        reduce-scattered and optimizer states sharded too. With train.fused_cross_entropy the head stays in the
        root: the fused loss multiplies by its weight after the forward pass, which the root keeps gathered
        until the backward pass ends. The optimizer is made after sharding: it must hold the shards."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        for layer in layers_to_shard(model):
            fully_shard(layer)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and head.weight is not embedding.weight:  # a tied pair must stay in one unit
            fully_shard(embedding)
            if not self.cfg.train.fused_cross_entropy:
                fully_shard(head)
        fully_shard(model)
        # peft's generate calls the inner model, which would bypass the root's hooks (they gather the root's
        # parameters and start the layers' prefetching).
        register_fsdp_forward_method(model, "generate")
        return model, make_optimizer(optimizer_params(model, self.cfg))

    def gradient_sync(self, wrapped: nn.Module, sync: bool):
        return super().gradient_sync(wrapped, sync) if sync else _no_sync(wrapped)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return full_trainable_state(model)

    def optimizer_state(self, wrapped: nn.Module, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(resharded(wrapped), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, wrapped: nn.Module, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on the CPU, keyed as in model.state_dict() (what peft's
    save_pretrained filters the adapter from); only trainable weights are gathered, never the 4-bit base. A
    collective when `model` is sharded: every rank calls it."""
    return {name: full(p.detach()).cpu() for name, p in resharded(model).named_parameters() if p.requires_grad}


def layers_to_shard(model: nn.Module) -> list[nn.Module]:
    """The decoder layers FSDP shards one by one; a ConfigError if the model has none."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"scaling.strategy=fsdp: {type(model).__name__} has no transformers decoder layer "
                          "(GradientCheckpointingLayer), so FSDP has no layers to shard one by one",
                          "use scaling.strategy=ddp for this model")
    return layers


@contextlib.contextmanager
def _no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


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


def store_4bit_as(model: nn.Module, dtype: torch.dtype) -> None:
    """Re-type the packed 4-bit weights (uint8) as `dtype` elements, the same bytes, as bitsandbytes'
    bnb_4bit_quant_storage does at quantization: FSDP2 shards floating-point parameters only (measured: uint8
    storage fails on CUDA with "only Tensors of floating point dtype can require gradients"). Done after
    loading rather than through quant_storage because a pre-quantized checkpoint keeps the storage it was
    saved with, whatever quantization_config asks."""
    import bitsandbytes as bnb
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, bnb.nn.Params4bit) or w.dtype == dtype:
            continue
        packed = w.data.reshape(-1).view(dtype).reshape(-1, 1)  # bytes regrouped, nothing converted
        module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=w.quant_state, blocksize=w.blocksize,
                                          compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                          quant_storage=dtype, module=module, bnb_quantized=True)
        module.quant_storage = dtype
