"""Model FLOPs utilisation (MFU) of a LoRA training step, the number every run reports beside tokens/s.

FLOPs counted per trained token, on the LoRA basis (the base weights get no weight gradients):
    4 N                 forward (2N) + backward to the activations (2N); N = all base parameters
    + 12 L h s          attention scores and values, forward + backward, for a sequence of s tokens
and per micro-batch, with DoRA (lora.use_dora), what peft's DoRA layer computes in each forward pass whatever
the token count: the LoRA weight B A as lora_B(lora_A(I)), 2 r i (i + o) for an i-in, o-out layer, and the
column norms of W + s B A, 3 o i (add, square, sum). The norms are detached, so no backward (DoRA paper, 4.3).
Recomputation by activation checkpointing is not counted: it is overhead, not useful work.
"""
from __future__ import annotations

from typing import Optional

# Throughput by the wall clock (the worker's Clock), beside the per-window tokens_per_second: in the final
# metrics, metrics.json and the train job's last JSON line.
CLOCK_KEYS = ("clock_tokens_per_second", "clock_tokens_per_second_after_first_step", "first_step_seconds",
              "eval_seconds", "report_seconds")

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts unless named).
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "B200": 2250.0}


def peak_flops(device_name: str) -> Optional[float]:
    """Peak FLOP/s of a GPU by its CUDA name, or None when unknown (then no MFU is reported)."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS[key] * 1e12
    return None


def step_flops(n_params: int, n_layers: int, hidden: int, row_lengths: list[int]) -> float:
    """Useful FLOPs of one forward+backward over rows of the given (unpadded) lengths."""
    tokens = sum(row_lengths)
    return 4.0 * n_params * tokens + 12.0 * n_layers * hidden * sum(s * s for s in row_lengths)


def example_lengths(row: dict) -> list[int]:
    """Lengths of the examples in a row: one, or several in a packed row (positions restart at 0)."""
    positions = row.get("position_ids")
    if positions is None:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [b - a for a, b in zip(starts, starts[1:])]


def dora_flops(layers: list[tuple[int, int]], r: int) -> float:
    """FLOPs of peft's DoRA work in one forward pass over (in_features, out_features) adapted layers."""
    return float(sum(2 * r * i * (i + o) + 3 * o * i for i, o in layers))


def dora_layers(model) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of every layer with a DoRA magnitude vector, and their LoRA rank (0 without DoRA)."""
    layers, rank = [], 0
    for module in model.modules():
        magnitude = getattr(module, "lora_magnitude_vector", None)
        if magnitude:  # a peft LoRA layer with DoRA: a non-empty ModuleDict of magnitudes
            base = module.get_base_layer()
            layers.append((base.in_features, base.out_features))
            rank = next(iter(module.r.values()))
    return layers, rank


class FlopCounter:
    """Accumulates useful FLOPs between reports; `mfu(seconds)` turns them into a utilisation.
    `per_forward`: FLOPs every forward pass adds whatever its tokens (DoRA's, see dora_flops)."""

    def __init__(self, n_params: int, model_config, device_name: Optional[str], per_forward: float = 0.0):
        text = getattr(model_config, "text_config", None) or model_config
        self.n_params, self.layers, self.hidden = n_params, text.num_hidden_layers, text.hidden_size
        self.peak = peak_flops(device_name) if device_name else None
        self.per_forward = per_forward
        self.flops = 0.0

    def add(self, row_lengths: list[int], forward_only: bool = False) -> None:
        """One micro-batch's forward and backward over rows of these (unpadded) lengths; `forward_only`: a
        forward pass without gradients (a third of the work: the backward pass costs twice the forward)."""
        flops = step_flops(self.n_params, self.layers, self.hidden, row_lengths)
        self.flops += (flops / 3 if forward_only else flops) + self.per_forward

    def mfu(self, seconds: float) -> Optional[float]:
        """Utilisation of this worker's GPU over `seconds`; None on CPU or an unknown GPU."""
        if self.peak is None or seconds <= 0:
            return None
        return self.flops / seconds / self.peak

    def reset(self) -> None:
        self.flops = 0.0


def base_param_count(model) -> int:
    """Parameters of the frozen base as if unquantized (bitsandbytes packs two 4-bit values per byte)."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None else p.numel()
    return total
