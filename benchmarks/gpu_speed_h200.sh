#!/usr/bin/env bash
# Issue 8 on one H200 (benchmarks/RESULTS.md, "Speed on one H200"): the Llama-3-8B step of benchmarks/speed.py
# (4 x 2048 random tokens), each variant timed and then profiled (--profile: GPU time by kernel kind).
#   PART=profile        the peer loop (../shared/gpu/peer_baseline.py, carried as .whl/peer_baseline.py), then
#                       compile with Liger's layer kernels (+ selective checkpointing, batch 8) and without them
#   PART=checkpointing  compile (Liger's loss only): checkpointed fractions, none, and memory budgets
#   PART=budget         compile_memory_budget 0.2-0.6 without whole-layer checkpointing (BUDGETS to change)
#   PEER=1              the peer loop first in any part (PART=profile always runs it)
#   run(command="PART=profile bash benchmarks/gpu_speed_h200.sh", carry=[".whl/base", ".whl/peer_baseline.py"])
set -o pipefail
OUT=${OUT:-/tmp/gpu_speed_h200_out}
mkdir -p "$OUT"
M=/tmp/rand-llama-8b
COMPILED=autocast,fused-ce,liger-ce,compile  # as the worker runs train.compile with kernels=liger

ours() {  # $1 name, $2 untimed leading variants, $3 variants
  timeout ${SPEED_TIMEOUT:-500} python3 benchmarks/speed.py --model $M --warmup 2 --steps 5 --profile 2 \
    --out "$OUT/$1.jsonl" --first-measured "$2" --variants "$3" > "$OUT/$1.log" 2>&1; echo "$1: exit $?"
  grep "^{" "$OUT/$1.log" | cut -c1-400 || tail -20 "$OUT/$1.log"
}

main() {
  . benchmarks/gpu_base_env.sh || return 1
  make_random_8b $M
  if [ "$PART" = profile ] || [ -n "$PEER" ]; then
    timeout 200 python3 .whl/peer_baseline.py --model 8b --bs 4 --seq 2048 --quant nf4 --gc 1 --steps 6 --warmup 2 \
      2>&1 | grep "^{" | tee "$OUT/peer.jsonl"
  fi
  case "$PART" in
    profile)
      ours liger_layers 3 autocast,fused-ce,liger,compile,selective:0.85,selective:1.0,bs:8
      ours liger_loss 3 $COMPILED ;;
    checkpointing)
      ours checkpointing 3 $COMPILED,selective:0.85,selective:0.7,selective:0,budget:0.5,selective:0.5,budget:0.2,selective:0 ;;
    budget)
      ours budget 5 $COMPILED,selective:0,${BUDGETS:-budget:0.2,budget:0.3,budget:0.4,budget:0.5,budget:0.6,selective:0.15} ;;
    *) echo "PART=profile|checkpointing|budget"; return 1 ;;
  esac
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
