"""FP8 matmuls for the frozen 4-bit base (train.fp8_base): the largest share of a QLoRA step's work.

bitsandbytes dequantizes each NF4 weight to bf16 and multiplies in bf16, in the forward pass and again for
the input gradient of the backward pass (the base is frozen: no weight gradient). Here the dequantized weight
and the activations are scaled row by row into float8 e4m3 and multiplied by the FP8 tensor cores
(`torch._scaled_mm`, twice bf16's peak on Hopper), with a bf16 result:

    forward   y  = x @ W.T       x scaled per token (row of x),        W per output feature (row of W)
    backward  dx = dy @ W        dy scaled per token (row of dy),      W per input feature (column of W)

Row-wise scales follow each row's own range, so e4m3's 3 mantissa bits are the only loss (relative error of
an element at most 2^-4): the recipe torchao calls "rowwise", here for the frozen base only. LoRA's own
matmuls, attention, norms and the loss stay in bf16, so the trained weights and their gradients are bf16.
The packed NF4 weight is all that is kept: the FP8 copies are made and dropped per matmul (half the size of
the bf16 copy bitsandbytes makes). In compiled layers (train.compile) the FP8 weight is decoded straight from
the 4-bit codes in one fused pass; eagerly, from bitsandbytes' dequantize. Measured on an H100 and what the
scaling kernels cost: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import functools

import torch

from qlora.errors import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (L4, L40S) and Hopper (H100, H200)


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 scale that maps a range `amax` onto e4m3's (an all-zero row gets a tiny one, not 0)."""
    return amax.float().clamp(min=1e-12) / FP8_MAX


def cast(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale in e4m3, saturated at its largest value."""
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t scaled row by row into e4m3, the fp32 [rows, 1] scales): t ~= fp8.float() * scale."""
    scale = scale_for(t.abs().amax(dim=-1, keepdim=True))
    return cast(t, scale), scale


def dequantize(weight, quant_state) -> torch.Tensor:
    """bitsandbytes' own dequantization of a 4-bit weight (imported here: qlora imports without bitsandbytes)."""
    import bitsandbytes.functional as bnb_f
    return bnb_f.dequantize_4bit(weight, quant_state)


def block_absmax(quant_state) -> torch.Tensor:
    """The fp32 scale of every 4-bit block, undoing double quantization (bitsandbytes' dequantize_blockwise:
    an 8-bit code looked up, times its group's fp32 scale, plus the offset)."""
    absmax = quant_state.absmax
    if not quant_state.nested:
        return absmax.float()
    inner = quant_state.state2
    groups = torch.arange(absmax.numel(), device=absmax.device) // inner.blocksize
    return inner.code[absmax.long()] * inner.absmax[groups] + quant_state.offset


def fusable(quant_state) -> bool:
    """Blocks that never cross a row (in_features a multiple of the block size, as in every Llama layer)."""
    return quant_state.shape[1] % quant_state.blocksize == 0


def nf4_to_fp8(weight, quant_state, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit weight W [N, K] (or W.T [K, N]) straight into row-scaled e4m3, in elementwise torch ops that the
    compiler fuses into one pass over the packed bytes (no bf16 copy of W is written, as bitsandbytes' dequantize
    would). The scales need no pass over W: a block's largest element dequantizes to exactly its absmax (the
    4-bit code, NF4 or FP4, holds -1 and 1), so a row's range is the largest absmax of its blocks, and a
    column's is bounded by the largest absmax of the blocks it crosses (a bound wastes a little range, never
    overflows)."""
    n, k = quant_state.shape
    scales = block_absmax(quant_state).view(n, k // quant_state.blocksize)
    packed = weight.view(torch.uint8).view(n, k // 2)  # FSDP types the packed bytes as the compute dtype
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).view(n, k).long()  # high nibble first
    w = (quant_state.code[codes].view(n, scales.shape[1], -1) * scales[..., None]).view(n, k)
    if transposed:
        scale = scale_for(scales.amax(0).repeat_interleave(quant_state.blocksize)[:, None])
        return cast(w.t(), scale).contiguous(), scale
    scale = scale_for(scales.amax(1, keepdim=True))
    return cast(w, scale), scale


def weight_fp8(weight, quant_state, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """W (or W.T) in row-scaled e4m3. Compiled: decoded from the 4-bit codes in one fused pass. Eager: from
    bitsandbytes' dequantize (its CUDA kernel; the torch decode would materialize int64 indices)."""
    if torch.compiler.is_compiling() and fusable(quant_state):
        return nf4_to_fp8(weight, quant_state, transposed)
    w = dequantize(weight, quant_state)
    return rowwise_fp8(w.t().contiguous() if transposed else w)


def scaled_matmul(a: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """a [M, K] (bf16/fp32, scaled here by its rows) @ b.T for b [N, K] already in e4m3 with [N, 1] scales."""
    aq, a_scale = rowwise_fp8(a)
    # _scaled_mm wants its second operand column-major: the transpose of a row-major [N, K].
    return torch._scaled_mm(aq, b_fp8.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=a.dtype)


class FP8BaseMatmul(torch.autograd.Function):
    """x @ W.T for a frozen NF4 weight W, both matmuls in FP8. Keeps only the packed weight for backward."""

    @staticmethod
    def forward(ctx, x, weight, quant_state):
        ctx.quant_state = quant_state
        ctx.save_for_backward(weight)
        return scaled_matmul(x, *weight_fp8(weight, quant_state, transposed=False))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        # dx = dy @ W: W's columns become the rows that are scaled, so W goes in transposed (row-major).
        return scaled_matmul(grad, *weight_fp8(weight, ctx.quant_state, transposed=True)), None, None


@functools.cache
def fp8_linear4bit_class(linear4bit_cls: type) -> type:
    """A subclass of bitsandbytes' Linear4bit whose forward multiplies in FP8 (its weights and state dict are
    the parent's: adapters, checkpoints and merges see a plain Linear4bit)."""

    class FP8Linear4bit(linear4bit_cls):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            in_dtype = x.dtype
            if self.compute_dtype is not None:
                x = x.to(self.compute_dtype)
            flat = x.reshape(-1, x.shape[-1])
            y = FP8BaseMatmul.apply(flat, self.weight, self.weight.quant_state).reshape(*x.shape[:-1], -1)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.to(in_dtype)

    return FP8Linear4bit


def runs_rowwise_fp8(device: torch.device) -> bool:
    """Whether torch multiplies row-scaled FP8 on this device (CPU builds before torch 2.13 take one scale per
    tensor only; GPUs need FP8 tensor cores)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
    ones = torch.ones(16, 16, device=device).to(FP8)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.float32)
        return True
    except RuntimeError:
        return False


def check_device(device: torch.device) -> None:
    """Refuse a device that cannot run the FP8 path before any weight is loaded."""
    if runs_rowwise_fp8(device):
        return
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"train.fp8_base needs FP8 tensor cores (compute capability 8.9 or newer: L4, L40S, H100, H200); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}", "set train.fp8_base=false on this GPU")
    raise ConfigError(f"train.fp8_base: torch {torch.__version__} has no row-scaled FP8 matmul on {device.type}",
                      "set train.fp8_base=false (it speeds up GPUs, not CPUs), or use torch 2.13 or newer")


def use_fp8_base(model) -> int:
    """Switch every 4-bit linear layer of `model` to FP8 matmuls, in place. Returns how many."""
    import bitsandbytes as bnb
    fp8_cls = fp8_linear4bit_class(bnb.nn.Linear4bit)
    count = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = fp8_cls
            count += 1
    if not count:
        raise ConfigError("train.fp8_base found no 4-bit linear layers in the model",
                          "set quantization.bits=4, or train.fp8_base=false")
    return count
