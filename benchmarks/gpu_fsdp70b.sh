#!/usr/bin/env bash
# Issue 9 on one H200: a Llama-3-70B-shape QLoRA training step through qlora.modeling, from a random NF4
# checkpoint written layer by layer (benchmarks/make_random_nf4.py: no 16-bit copy, in memory or on disk),
# with the FSDP path (one-rank mesh) and the DDP path; host RAM of the load.
#   run(command="bash benchmarks/gpu_fsdp70b.sh", carry=[".whl"])   (.whl/: see gpu_ray_overhead.sh)
set -o pipefail
OUT=${OUT:-/tmp/gpu_fsdp70b_out}
mkdir -p "$OUT"
M=/tmp/rand-llama-70b-nf4

main() {
  . benchmarks/gpu_base_env.sh || return 1
  df -h /tmp | tail -1; free -g | head -2
  [ -f $M/config.json ] || timeout 240 python3 benchmarks/make_random_nf4.py --shape 70b $M 2>&1 | grep "^{\|Error" || return 1
  du -sh $M
  timeout 420 python3 benchmarks/fsdp_check.py --model $M --bs 2 --seq 2048 --steps 3 --warmup 1 --strategies ddp,fsdp \
    --out "$OUT/70b.jsonl" > "$OUT/70b.log" 2>&1; echo "exit $?"
  grep "^{" "$OUT/70b.log" || grep -v "Warning\|warn" "$OUT/70b.log" | tail -40
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
