#!/usr/bin/env bash
# Issue 9 on one GPU: scaling.strategy=fsdp with train.fused_cross_entropy (Liger's fused linear
# cross-entropy and kernels), against the DDP path: 1B and Llama-3-8B shapes, random weights, 4 x 2048.
#   run(command="bash benchmarks/gpu_fsdp_fused.sh", carry=[".whl"])   (.whl/: see gpu_ray_overhead.sh)
set -o pipefail
OUT=${OUT:-/tmp/gpu_fsdp_fused_out}
mkdir -p "$OUT"
M1=/tmp/rand-llama-1b-v49k

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/base/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  [ -f $M1/config.json ] || python3 benchmarks/make_random_llama.py "$M1" > /dev/null 2>&1 || return 1
  echo "=== 1B shape, Liger + fused loss"
  timeout 150 python3 benchmarks/fsdp_check.py --model $M1 --steps 8 --kernels liger --fused --out "$OUT/1b.jsonl" 2>&1 | grep "^{\|Error" | tail -4
  timeout 100 python3 - <<'PY' || return 1
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
with torch.device("cuda"):
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained("/tmp/rand-llama-8b", max_shard_size="5GB")
PY
  echo "=== 8B shape, Liger + fused loss"
  timeout 200 python3 benchmarks/fsdp_check.py --model /tmp/rand-llama-8b --tokenizer $M1 --steps 6 --kernels liger --fused \
    --out "$OUT/8b.jsonl" 2>&1 | grep "^{\|Error" | tail -4
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
