"""Model sources (packaged GGUF, folders, hub ids) and the LoRA trainable-parameter check."""
import time
from pathlib import Path

import pytest
import torch

from qlora import modeling
from qlora.config import JobConfig, LoraSection, QuantizationSection
from qlora.errors import ConfigError
from qlora.model_source import ModelSource, resolve
from qlora.strategies import STRATEGIES


def test_packaged_gguf_is_converted_once_to_safetensors(smollm_dir):
    assert (smollm_dir / "config.json").is_file() and list(smollm_dir.glob("*.safetensors"))
    t = time.perf_counter()
    assert Path(resolve("smollm2-135m").path) == smollm_dir  # cache hit: keyed by the file's hash
    assert time.perf_counter() - t < 5


def test_model_name_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not an existing path"):
        resolve("./nowhere")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError, match="could not be read"):
        resolve(str(bad))
    assert resolve("meta-llama/Llama-3.1-8B") == ModelSource("meta-llama/Llama-3.1-8B", False, "hub:meta-llama/Llama-3.1-8B")


def test_compute_dtype_follows_hardware():
    q = QuantizationSection()
    assert modeling.compute_dtype(q, torch.device("cpu")) == torch.float32
    assert modeling.compute_dtype(QuantizationSection(compute_dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16


def _cfg(model_dir, **lora):
    return JobConfig.model_validate({"model": {"name": str(model_dir)}, "data": {"path": "x"}, "lora": lora})


@pytest.mark.parametrize("lora, per_layer", [
    ({"target_modules": "all-linear"}, None),
    ({"target_modules": ["q_proj", "v_proj"], "r": 4}, (64 + 64) + (64 + 32)),
    ({"target_modules": ["q_proj"], "layers_to_transform": [1], "r": 2}, None),
])
def test_lora_count_matches_independent_computation_on_4bit_model(tiny_model_dir, lora, per_layer):
    cfg = _cfg(tiny_model_dir, **lora)
    source = ModelSource(str(tiny_model_dir), True, "tiny")
    base = modeling.load_base_model(cfg, source, torch.device("cpu"))
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = modeling.attach_lora(base, cfg.lora)
    count = modeling.lora_param_count(model)
    assert count == modeling.trainable_summary(model)["trainable_params"] > 0
    if per_layer:
        assert count == 2 * cfg.lora.r * per_layer  # 2 layers
    if cfg.lora.layers_to_transform:
        assert count == cfg.lora.r * (64 + 64)


def test_lora_on_nothing_fails_loudly(tiny_model_dir):
    source = ModelSource(str(tiny_model_dir), True, "tiny")
    with pytest.raises(ConfigError, match="matches no module"):
        modeling.meta_lora_model(_cfg(tiny_model_dir, target_modules=["nonexistent"]), source)
    with pytest.raises(ConfigError, match="adapts nothing|matches no module"):
        modeling.meta_lora_model(_cfg(tiny_model_dir, target_modules=["q_proj"], layers_to_transform=[7]), source)


def test_verify_rejects_a_count_mismatch(tiny_model_dir):
    model = modeling.meta_lora_model(_cfg(tiny_model_dir), ModelSource(str(tiny_model_dir), True, "tiny"))
    with pytest.raises(ConfigError, match="peft made"):
        modeling.verify_lora_params(model, modeling.lora_param_count(model) + 1, LoraSection())


def test_an_evaluation_does_not_change_the_next_training_gradients(tiny_model_dir):
    """bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first no-grad
    eval-mode forward, and that path has no autograd (wrong gradients afterwards). On CPUs without
    AVX512-BF16 it never repacks, and this test checks the plain path."""
    cfg = _cfg(tiny_model_dir)
    source = ModelSource(str(tiny_model_dir), True, "tiny")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

    def lora_grads(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        model = modeling.attach_lora(modeling.load_base_model(cfg, source, torch.device("cpu")), cfg.lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: no gradient would reach the first layers' A
                p.data.normal_(0, 0.05)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fresh, after_eval = lora_grads(False), lora_grads(True)
    assert fresh.keys() == after_eval.keys() and fresh
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-3, atol=1e-5, msg=name)


def test_fsdp_loads_4bit_weights_with_floating_point_storage(tiny_model_dir, tmp_path):
    """A pre-quantized NF4 checkpoint (what save_pretrained writes for a 4-bit model; the *-bnb-4bit hub
    uploads) keeps its uint8 storage whatever quantization_config asks, and FSDP2 shards floating-point
    tensors only. Under scaling.strategy=fsdp the packed bytes are re-typed, not converted: same logits."""
    source = ModelSource(str(tiny_model_dir), True, "tiny")
    modeling.load_base_model(_cfg(tiny_model_dir), source, torch.device("cpu")).save_pretrained(tmp_path / "nf4")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, storage = {}, {}
    for strategy in ("ddp", "fsdp"):
        cfg = JobConfig.model_validate({**_cfg(tmp_path / "nf4").model_dump(), "scaling": {"strategy": strategy}})
        model = modeling.load_base_model(cfg, ModelSource(str(tmp_path / "nf4"), True, "nf4"), torch.device("cpu"),
                                         prepare=STRATEGIES[strategy].prepare_base)
        storage[strategy] = {p.dtype for n, p in model.named_parameters() if "proj" in n}
        with torch.no_grad():
            logits[strategy] = model(input_ids=ids).logits
    assert storage == {"ddp": {torch.uint8}, "fsdp": {torch.float32}}
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], rtol=0, atol=0)
    # Quantized on load from 16-bit weights, the same re-typing applies.
    fresh = modeling.load_base_model(JobConfig.model_validate({**_cfg(tiny_model_dir).model_dump(),
                                                               "scaling": {"strategy": "fsdp"}}),
                                     source, torch.device("cpu"), prepare=STRATEGIES["fsdp"].prepare_base)
    assert {p.dtype for n, p in fresh.named_parameters() if "proj" in n} == {torch.float32}
