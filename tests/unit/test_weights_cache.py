"""The quantized base kept per machine (qlora/weights_cache.py): quantized once, loaded from the cache after,
computing exactly what a fresh quantization computes; keyed by the source's bytes and the settings."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qlora import modeling, weights_cache
from qlora.config import JobConfig
from qlora.model_source import ModelSource

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "quantized"


def _cfg(model: str, **quantization) -> JobConfig:
    return JobConfig.model_validate({"model": {"name": model}, "data": {"path": "x"}, "quantization": quantization})


def _load(cfg: JobConfig, source: ModelSource, **kwargs):
    lines = []
    model = modeling.load_base_model(cfg, source, CPU, report=lines.append, **kwargs)
    return model, lines


def test_a_second_load_comes_from_the_cache_and_computes_the_same(tiny_model_dir, cache):
    cfg, source = _cfg(str(tiny_model_dir)), ModelSource(str(tiny_model_dir), True, "tiny")
    fresh, said = _load(cfg, source)
    assert len(said) == 1 and "quantized in" in said[0] and "kept in" in said[0], said
    [entry] = list(cache.iterdir())
    assert (entry / weights_cache.INFO).is_file() and not list(cache.parent.glob("quantized/*.tmp*"))

    cached, said = _load(cfg, source)
    assert said == [f"4-bit base loaded from the quantized-weights cache {entry} in {said[0].split(' in ')[-1]}"]
    assert type(cached.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=0)
    # The same parameters in the same dtypes (k-bit preparation cast the same tensors to fp32 in both).
    assert {n: (p.dtype, p.shape) for n, p in cached.named_parameters()} == \
        {n: (p.dtype, p.shape) for n, p in fresh.named_parameters()}


def test_a_cached_base_saves_as_a_fresh_one_does(tiny_model_dir, tmp_path, cache):
    """What export --merge does: dequantize and save_pretrained (transformers 5.17 cannot reverse the converter
    that rebuilt a pre-quantized checkpoint's weights; modeling.forget_4bit_deserialization)."""
    cfg, source = _cfg(str(tiny_model_dir)), ModelSource(str(tiny_model_dir), True, "tiny")
    saved = {}
    for name in ("fresh", "cached"):
        model, said = _load(cfg, source)
        assert ("from the quantized-weights cache" in said[0]) == (name == "cached")
        model.save_pretrained(tmp_path / f"{name}-4bit")
        model.dequantize(dtype=torch.float32).save_pretrained(tmp_path / name)
        saved[name] = load_file(next((tmp_path / name).glob("*.safetensors")))
    assert saved["cached"].keys() == saved["fresh"].keys()
    for key, tensor in saved["fresh"].items():
        torch.testing.assert_close(saved["cached"][key], tensor, rtol=0, atol=0, msg=key)


def test_the_key_follows_the_source_bytes_and_the_settings(tiny_model_dir, tmp_path, cache):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)  # copytree keeps modification times: the same bytes, the same key
    source = ModelSource(str(copy), True, "copy")

    def key(**quantization):
        return weights_cache.key(_cfg(str(copy), **quantization), source, torch.float32, CPU)

    base = key()
    assert base == weights_cache.key(_cfg(str(tiny_model_dir)), ModelSource(str(tiny_model_dir), True, "tiny"),
                                     torch.float32, CPU)
    others = {key(quant_type="fp4"), key(double_quant=False),
              weights_cache.key(_cfg(str(copy)), source, torch.bfloat16, CPU)}
    assert base not in others and len(others) == 3
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # the file was rewritten
    assert key() != base


def test_what_is_not_kept(tiny_model_dir, tmp_path, cache, monkeypatch):
    source = ModelSource(str(tiny_model_dir), True, "tiny")
    _load(_cfg(str(tiny_model_dir), cache_weights=False), source)
    _load(_cfg(str(tiny_model_dir), bits=8), source)
    _, said = _load(_cfg(str(tiny_model_dir)), source, keep_quantized=False)  # another worker of this node keeps it
    assert said == [said[0]] and "quantized in" in said[0] and "kept" not in said[0]
    assert not cache.exists()
    # A cache that cannot be written (here: its folder would sit under a file) costs the next job, not this one.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "a-file" / "cache"))
    model, said = _load(_cfg(str(tiny_model_dir)), source)
    assert "not kept" in said[0] and "quantization.cache_weights=false" in said[0] and model is not None
    # A pre-quantized checkpoint (what save_pretrained writes for a 4-bit model) is loaded as it is.
    modeling.load_base_model(_cfg(str(tiny_model_dir), cache_weights=False), source, CPU).save_pretrained(
        tmp_path / "nf4")
    nf4 = ModelSource(str(tmp_path / "nf4"), True, "nf4")
    assert weights_cache.key(_cfg(str(tmp_path / "nf4")), nf4, torch.float32, CPU) is None
    classifier = JobConfig.model_validate({"model": {"name": str(tiny_model_dir), "task": "sequence_classification"},
                                           "data": {"path": "x", "format": "classification"}})
    assert not weights_cache.applies(classifier, source) and weights_cache.applies(_cfg(str(tiny_model_dir)), source)


def test_a_hub_model_is_keyed_by_its_commit(tiny_model_dir, tmp_path, cache, monkeypatch):
    """A hub id resolves through the local hub cache (built here, offline): the snapshot's commit names it."""
    import huggingface_hub.constants
    hub = tmp_path / "hub"
    repo, commit = hub / "models--org--tiny", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg, source = _cfg("org/tiny"), ModelSource("org/tiny", False, "hub:org/tiny")
    identity = weights_cache.source_identity(source, None)
    assert identity["hub"] == "org/tiny" and identity["commit"] == commit
    assert weights_cache.source_identity(ModelSource("org/absent", False, "hub:org/absent"), None) is None
    _load(cfg, source)
    _, said = _load(cfg, source)
    assert "from the quantized-weights cache" in said[0]
