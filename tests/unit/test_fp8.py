"""train.fp8_base (qlora/fp8.py): the frozen 4-bit base's matmuls in FP8 against bitsandbytes' own bf16/fp32
path on the same packed weights. torch runs FP8 `_scaled_mm` on CPU too, so every test runs here; the CUDA cases
(marked gpu) run on the GPU host with `pytest -m gpu tests/unit/test_fp8.py -o addopts=""`."""
import pytest
import torch

from qlora import fp8, modeling, preflight
from qlora.config import JobConfig, validate
from qlora.errors import ConfigError
from qlora.model_source import ModelSource



DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not fp8.runs_rowwise_fp8(torch.device("cpu")),
                                                         reason="this torch's CPU FP8 matmul is per-tensor only")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA GPU")])]
E4M3_RELATIVE = 2.0 ** -4  # half the spacing of e4m3's 3-bit mantissa
E4M3_SMALLEST = 2.0 ** -9  # e4m3's smallest subnormal step, in units of a row's scale


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_rowwise_scales_follow_each_rows_range():
    torch.manual_seed(0)
    t = torch.randn(6, 256) * torch.logspace(-4, 4, 6)[:, None]  # rows eight orders of magnitude apart
    q, scale = fp8.rowwise_fp8(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    back = q.float() * scale
    assert torch.all((back - t).abs() <= E4M3_RELATIVE * t.abs() + E4M3_SMALLEST * scale)
    assert torch.allclose(back.abs().amax(1), t.abs().amax(1), rtol=1e-6)  # each row's largest is exact


def linear4bit(device: str, n_out: int = 96, n_in: int = 128):
    """bitsandbytes' NF4 layer (double quantization, as the job loads it) with seeded random weights."""
    import bitsandbytes as bnb
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) / n_in ** 0.5, requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(n_out))
    return layer.to(device)


def output_and_input_grad(layer, x: torch.Tensor):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype))
    return y.detach(), x.grad


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_layer_eager_and_compiled_matches_bitsandbytes_forward_and_input_grad(device):
    layer = linear4bit(device)
    torch.manual_seed(1)
    x = torch.randn(2, 24, 128, device=device)
    y_ref, dx_ref = output_and_input_grad(layer, x)
    keys = set(layer.state_dict())
    assert fp8.use_fp8_base(layer) == 1
    assert type(layer).__name__ == "FP8Linear4bit" and set(layer.state_dict()) == keys  # checkpoints unchanged
    y, dx = output_and_input_grad(layer, x)
    assert y.dtype == y_ref.dtype and dx.shape == dx_ref.shape
    # Two e4m3 operands: about 2^-5 relative error per product, averaged down over K terms.
    assert 0 < relative_error(y, y_ref) < 0.05  # > 0: the FP8 path ran (bitsandbytes' would match exactly)
    assert relative_error(dx, dx_ref) < 0.05
    torch._dynamo.reset()
    y_c, dx_c = output_and_input_grad(torch.compile(layer, fullgraph=True), x)  # the fused 4-bit decode
    assert relative_error(y_c, y_ref) < 0.05 and relative_error(dx_c, dx_ref) < 0.05
    # The forward pass scales W's rows alike on both paths (bf16 vs fp32 W before the cast moves a few elements to
    # a neighbouring e4m3 value on GPUs); the backward's column scales differ (a bound when compiled), so each
    # rounds on its own grid: both within e4m3's error of bitsandbytes, not of each other.
    assert relative_error(y_c, y) < 0.02


def test_weight_decoded_from_4bit_codes_matches_bitsandbytes_dequantize():
    """The compiled path's decode (qlora.fp8.nf4_to_fp8, run eagerly here) against bitsandbytes' dequantize: the
    same row scales (taken from the block absmax, not from W), the same e4m3 values; the transposed weight within
    e4m3's precision under its column bound."""
    layer = linear4bit("cpu")
    weight, state = layer.weight, layer.weight.quant_state
    w = fp8.dequantize(weight, state).float()
    q, scale = fp8.nf4_to_fp8(weight, state, transposed=False)
    q_ref, scale_ref = fp8.rowwise_fp8(w)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), q_ref.float())
    qt, scale_t = fp8.nf4_to_fp8(weight, state, transposed=True)
    assert qt.shape == (128, 96) and qt.is_contiguous() and torch.all(scale_t[:, 0] >= w.abs().amax(0) / fp8.FP8_MAX)
    back = qt.float() * scale_t
    assert torch.all((back - w.t()).abs() <= E4M3_RELATIVE * w.t().abs() + E4M3_SMALLEST * scale_t)


def lora_grads(model_dir, use_fp8: bool) -> tuple[float, torch.Tensor]:
    cfg = JobConfig.model_validate({"model": {"name": str(model_dir)}, "data": {"path": "unused.jsonl"},
                                    "lora": {"r": 8, "dropout": 0.0, "target_modules": "all-linear"}})
    base = modeling.load_base_model(cfg, ModelSource(str(model_dir), True, "test"), torch.device("cpu"))
    if use_fp8:
        assert fp8.use_fp8_base(base) == 14  # 7 linear layers in each of 2 decoder layers
    torch.manual_seed(0)
    model = modeling.attach_lora(base, cfg.lora)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_lora_gradients_through_an_fp8_base_point_where_bitsandbytes_do(tiny_model_dir):
    loss, grads = lora_grads(tiny_model_dir, use_fp8=False)
    loss_fp8, grads_fp8 = lora_grads(tiny_model_dir, use_fp8=True)
    assert abs(loss_fp8 - loss) < 0.01 * loss
    assert torch.nn.functional.cosine_similarity(grads_fp8, grads, dim=0) > 0.99
    assert grads.abs().sum() > 0


def test_fp8_base_needs_a_4bit_base():
    with pytest.raises(ConfigError, match="train.fp8_base .* quantization.bits=8: set quantization.bits=4"):
        validate(JobConfig, {"model": {"name": "m"}, "data": {"path": "d.jsonl"}, "train": {"fp8_base": True},
                             "quantization": {"bits": 8}})
    with pytest.raises(ConfigError, match="no 4-bit linear layers"):
        fp8.use_fp8_base(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_local_cpu_job_is_refused_before_ray_exactly_when_torch_cannot_run_it():
    """The preflight (before any cluster starts) asks the local device what the workers would: torch 2.13's CPU
    build runs row-scaled FP8 (this machine: no error), older builds are refused with the version and the fix."""
    cfg = validate(JobConfig, {"model": {"name": "m"}, "data": {"path": "d.jsonl"}, "train": {"fp8_base": True},
                               "scaling": {"num_workers": 1}})
    if fp8.runs_rowwise_fp8(torch.device("cpu")):
        preflight.check_compute(cfg)
    else:
        with pytest.raises(ConfigError, match="no row-scaled FP8 matmul on cpu"):
            preflight.check_compute(cfg)
