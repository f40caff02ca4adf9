#!/usr/bin/env bash
# Issue 9 on one GPU: scaling.strategy=fsdp with train.fused_cross_entropy (Liger's fused linear
# cross-entropy and kernels), against the DDP path: 1B and Llama-3-8B shapes, random weights, 4 x 2048.
#   run(command="bash benchmarks/gpu_fsdp_fused.sh", carry=[".whl"])   (.whl/: see gpu_ray_overhead.sh)
set -o pipefail
OUT=${OUT:-/tmp/gpu_fsdp_fused_out}
mkdir -p "$OUT"
M1=/tmp/rand-llama-1b-v49k

main() {
  . benchmarks/gpu_base_env.sh || return 1
  [ -f $M1/config.json ] || python3 benchmarks/make_random_llama.py "$M1" > /dev/null 2>&1 || return 1
  echo "=== 1B shape, Liger + fused loss"
  timeout 150 python3 benchmarks/fsdp_check.py --model $M1 --steps 8 --kernels liger --fused --out "$OUT/1b.jsonl" 2>&1 | grep "^{\|Error" | tail -4
  make_random_8b /tmp/rand-llama-8b || return 1
  echo "=== 8B shape, Liger + fused loss"
  timeout 200 python3 benchmarks/fsdp_check.py --model /tmp/rand-llama-8b --tokenizer $M1 --steps 6 --kernels liger --fused \
    --out "$OUT/8b.jsonl" 2>&1 | grep "^{\|Error" | tail -4
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
