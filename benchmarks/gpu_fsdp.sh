#!/usr/bin/env bash
# Issue 9 on one GPU: scaling.strategy=fsdp's CUDA path vs the DDP path (benchmarks/fsdp_check.py) on the
# 1B shape (with and without Liger) and the Llama-3-8B shape, random weights, 4 x 2048 tokens.
#   run(command="bash benchmarks/gpu_fsdp.sh", carry=[".whl"])   (.whl/: see gpu_ray_overhead.sh)
set -o pipefail
OUT=${OUT:-/tmp/gpu_fsdp_out}
mkdir -p "$OUT"
M1=/tmp/rand-llama-1b-v49k

main() {
  . benchmarks/gpu_base_env.sh || return 1
  [ -f $M1/config.json ] || python3 benchmarks/make_random_llama.py "$M1" || return 1
  echo "=== 1B shape"
  timeout 200 python3 benchmarks/fsdp_check.py --model $M1 --steps 8 --out "$OUT/1b.jsonl" 2>&1 | grep "^{\|Error\|error" | tail -5
  echo "=== 1B shape, Liger kernels"
  timeout 200 python3 benchmarks/fsdp_check.py --model $M1 --steps 8 --kernels liger --out "$OUT/1b_liger.jsonl" 2>&1 | grep "^{\|Error\|error" | tail -5
  echo "=== 8B shape"
  make_random_8b /tmp/rand-llama-8b || return 1
  timeout 300 python3 benchmarks/fsdp_check.py --model /tmp/rand-llama-8b --tokenizer $M1 --steps 6 --out "$OUT/8b.jsonl" 2>&1 | grep "^{\|Error\|error" | tail -5
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
