"""Speed levers of the training step, each behind a config switch with a safe default.

- `train.kernels=liger`: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into the loaded model.
- `train.fused_cross_entropy`: the loss is computed from the last hidden states chunk by chunk, so the
  [tokens x vocab] logits (4 GB in fp32 for 8k tokens of a 128k vocabulary) never exist at once. Liger's
  fused linear cross-entropy kernel on GPU with kernels=liger; a chunked torch version (which recomputes
  each chunk's logits in the backward pass) otherwise, so the same path runs and is tested on CPU.
- `train.compile`: torch.compile of the decoder layers (fuses LoRA's and the norms' small ops). Liger's layer
  kernels are left out under compile (Inductor fuses those ops itself; Liger's RMSNorm breaks the graph).
- `train.compile_memory_budget`: what a compiled layer keeps for backward instead of recomputing it
  (AOTAutograd's activation memory budget), an alternative to checkpointing whole layers.
- `train.checkpointed_fraction`: selective activation checkpointing, recompute only some decoder layers.
- bf16 autocast on GPUs, as HF Trainer does: without it the fp32 residual stream that
  prepare_model_for_kbit_training leaves makes LoRA, attention and the head run in fp32.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.config import TrainSection
from qlora.data import IGNORE
from qlora.errors import ConfigError
from qlora.evaluation import token_losses
from qlora.modeling import decoder_layers

CHUNK_TOKENS = 4096  # rows of hidden states per chunk of the torch fused loss: [4096 x vocab] logits at a time


def require_liger() -> None:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"train.kernels=liger needs the liger-kernel package ({e})",
                          "pip install liger-kernel on the GPU nodes, or set train.kernels=none") from None


def apply_layer_kernels(model, train: TrainSection) -> None:
    """train.kernels=liger: Liger's layer kernels patched into the base model, except under train.compile,
    where only Liger's fused loss is used (Inductor fuses the layers' ops itself, and faster: Liger's RMSNorm
    breaks the compiled graph; benchmarks/RESULTS.md)."""
    if train.kernels != "liger":
        return
    if train.compile:
        require_liger()
    else:
        apply_liger(model)


def apply_liger(model) -> None:
    """Patch Liger's RMSNorm, SwiGLU and RoPE kernels into this model instance (not its loss: see below)."""
    require_liger()
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"train.kernels=liger has no kernels for model type {model_type!r}",
                          f"set train.kernels=none (Liger supports: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})")
    # Our loss is computed outside the model (fused_cross_entropy), so the model's forward stays HF's own.
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=False, cross_entropy=False)


def select_checkpointed_layers(model, fraction: float) -> list[int]:
    """Keep activation checkpointing on an evenly spread `fraction` of the decoder layers, off on the rest.
    Returns the indices that still recompute. Needs gradient checkpointing enabled first."""
    layers = [m for m in decoder_layers(model) if m.gradient_checkpointing]
    keep = round(fraction * len(layers))
    chosen = {round(i * len(layers) / keep) for i in range(keep)} if keep else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return sorted(chosen)


def compile_layers(model, memory_budget: Optional[float] = None) -> int:
    """torch.compile every decoder layer in place ("regional" compilation: the layers share code, so the
    graph compiled for the first is reused by the rest). Returns how many layers were compiled.
    `memory_budget` (0-1]: see set_activation_memory_budget; None keeps the compiler's default."""
    set_activation_memory_budget(1.0 if memory_budget is None else memory_budget)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


@contextlib.contextmanager
def for_evaluation(model, compiled: bool, attn_implementation: str = "sdpa"):
    """Held-out evaluation and generation: compiled layers run as plain eager code, and flex attention is
    swapped for sdpa. Their shapes and grad mode differ from the training step's, so each would compile
    another graph (measured on an H200: four recompiles in the first evaluation, which also made the training
    graph dynamic, so a later shape compiled again for 25 s); flex attention outside a compiled graph is
    unfused (it would build every score), and would rebuild its block mask at every generated token."""
    with contextlib.ExitStack() as stack:
        if compiled:
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        if attn_implementation == "flex_attention":
            hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
            hf_model.set_attn_implementation("sdpa")
            stack.callback(hf_model.set_attn_implementation, attn_implementation)
        yield


def set_activation_memory_budget(budget: float) -> None:
    """Let compiled graphs keep `budget` of the activation memory they would keep by default (1.0) for the
    backward pass and recompute the rest, choosing what to recompute by its FLOPs (AOTAutograd's knapsack).
    Process-wide; read when a graph compiles. bitsandbytes' matmuls are custom ops, which the partitioner
    would otherwise recompute as if they were free (it bans only built-in matmuls from recomputation):
    they are weighed by their FLOPs, which are registered with torch's FLOP counter."""
    count_bitsandbytes_matmul_flops()
    torch._functorch.config.is_non_builtin_to_include = True  # custom ops go through the knapsack, not free
    torch._functorch.config.activation_memory_budget = budget


def count_bitsandbytes_matmul_flops() -> None:
    """Teach torch's FLOP counter bitsandbytes' matmuls (it counts unknown ops as 0): 2 M N K each, for
    gemm_4bit (A [..., K] times a packed 4-bit weight: N from the output) and the int8 matmuls of 8-bit
    layers (an int8 A, or its int8 copy CA, times an int8 [N, K] weight)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula
    try:
        import bitsandbytes  # noqa: F401  (defines torch.ops.bitsandbytes)
    except ImportError:
        return  # no quantized layers to count
    formulas = {
        "gemm_4bit": lambda a, *args, out_shape=None, **kwargs: 2 * math.prod(out_shape) * a[-1],
        "int8_scaled_mm": lambda a, b, *args, **kwargs: 2 * math.prod(a) * b[0],
        "int8_mixed_scaled_mm": lambda a, ca, cb, *args, **kwargs: 2 * math.prod(ca) * cb[0],
    }
    for name, formula in formulas.items():
        op = getattr(torch.ops.bitsandbytes, name, None)
        if op is not None and op not in flop_registry:
            register_flop_formula(op)(formula)


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """What `autocast` casts to: bf16 on CUDA; None elsewhere (fp32 on CPU; fp16 would need a gradient scaler)."""
    return torch.bfloat16 if device.type == "cuda" and dtype == torch.bfloat16 else None


def autocast(device: torch.device, dtype: torch.dtype):
    cast = autocast_dtype(device, dtype)
    return contextlib.nullcontext() if cast is None else torch.autocast(device.type, dtype=cast)


def check_fused_loss(model_config) -> None:
    """train.fused_cross_entropy computes logits as hidden @ head.T: refuse models that transform them after."""
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(model_config, attr, None):
            raise ConfigError(f"train.fused_cross_entropy: this model transforms its logits ({attr}), which the "
                              "fused loss would skip", "set train.fused_cross_entropy=false for this model")


class HiddenStates:
    """Captures the input of the output head during the forward pass and hands the head a single position,
    so the model computes one row of logits instead of all of them. Works through DDP and peft wrappers,
    whatever the architecture, as long as the head is a plain linear layer applied last."""

    def __init__(self, model, liger: bool = False):
        self.liger = liger  # Liger's fused kernel (GPU) instead of the chunked torch loss
        check_fused_loss(getattr(model, "config", None))
        self.head = model.get_output_embeddings()
        self.value, self.active = None, False
        self.head.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        if not self.active:  # evaluation and generation use the model's own logits
            return None
        self.value = args[0]
        return (args[0][:, -1:],)

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (IGNORE skipped), chunk by chunk;
    each chunk's logits are recomputed in the backward pass instead of kept."""
    def piece(h, y):
        logits = F.linear(h, weight).float()
        return F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        h, y = hidden[i:i + chunk], labels[i:i + chunk]
        if (y != IGNORE).any():
            total = total + (checkpoint(piece, h, y, use_reentrant=False) if torch.is_grad_enabled() else piece(h, y))
    return total


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               liger: bool) -> torch.Tensor:
    if liger and hidden.is_cuda:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        # A Triton kernel sees no autocast: give it the matmul dtype autocast would have used.
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
        return loss(weight.to(dtype), hidden.to(dtype), labels)
    return chunked_linear_cross_entropy(hidden, weight, labels)


def next_token_loss(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, count of labels) from the model's logits."""
    return token_losses(model(**inputs).logits, labels)


def forward_loss(model, inputs: dict, labels: torch.Tensor, hidden: Optional[HiddenStates] = None,
                 task_loss=next_token_loss):
    """(summed loss, what it averages over) of one micro-batch. `inputs` are the forward arguments (padded:
    attention_mask; packed: position_ids). Without `hidden`: `task_loss(model, inputs, labels)` (the task's:
    next-token loss, a classifier's, a preference objective's). With `hidden` (train.fused_cross_entropy,
    causal LMs): the next-token loss from the captured hidden states, position t predicting label t+1."""
    if hidden is None:
        return task_loss(model, inputs, labels)
    hidden.active = True
    try:
        model(**inputs)
    finally:
        hidden.active = False
    shifted = labels[:, 1:]
    h = hidden.take()[:, :-1]
    loss = fused_linear_cross_entropy(h.reshape(-1, h.size(-1)), hidden.head.weight, shifted.reshape(-1),
                                      liger=hidden.liger)
    return loss, (shifted != IGNORE).sum()
