#!/usr/bin/env bash
# Issue 9 on one GPU: scaling.strategy=fsdp's CUDA path vs the DDP path (benchmarks/fsdp_check.py) on the
# 1B shape (with and without Liger) and the Llama-3-8B shape, random weights, 4 x 2048 tokens.
#   run(command="bash benchmarks/gpu_fsdp.sh", carry=[".whl"])   (.whl/: see gpu_ray_overhead.sh)
set -o pipefail
OUT=${OUT:-/tmp/gpu_fsdp_out}
mkdir -p "$OUT"
M1=/tmp/rand-llama-1b-v49k

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/base/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bnb', bitsandbytes.__version__)"
  [ -f $M1/config.json ] || python3 benchmarks/make_random_llama.py "$M1" || return 1
  echo "=== 1B shape"
  timeout 200 python3 benchmarks/fsdp_check.py --model $M1 --steps 8 --out "$OUT/1b.jsonl" 2>&1 | grep "^{\|Error\|error" | tail -5
  echo "=== 1B shape, Liger kernels"
  timeout 200 python3 benchmarks/fsdp_check.py --model $M1 --steps 8 --kernels liger --out "$OUT/1b_liger.jsonl" 2>&1 | grep "^{\|Error\|error" | tail -5
  echo "=== 8B shape"
  timeout 150 python3 - <<'PY' || return 1
import time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
t = time.time()
with torch.device("cuda"):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained("/tmp/rand-llama-8b", max_shard_size="5GB")
print(f"saved the 8B shape in {time.time() - t:.0f} s", flush=True)
PY
  timeout 300 python3 benchmarks/fsdp_check.py --model /tmp/rand-llama-8b --tokenizer $M1 --steps 6 --out "$OUT/8b.jsonl" 2>&1 | grep "^{\|Error\|error" | tail -5
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
