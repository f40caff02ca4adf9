#!/usr/bin/env bash
# Issue 22, route 1 on one GPU: the frozen 4-bit base's matmuls in FP8 (train.fp8_base, qlora/fp8.py), side by side
# with the peer loop (../shared/gpu/peer_baseline.py, carried as .whl/peer_baseline.py) in the same call.
#   1. pytest tests/unit/test_fp8.py on the GPU (FP8 against bitsandbytes' bf16 path, eager and compiled)
#   2. the peer, Llama-3-8B shape, 4 x 2048 random tokens, full checkpointing
#   3. benchmarks/speed.py, same shape and tokens: the shipped fast config's levers (compile, budget 0.2, Liger's
#      loss), then + fp8, then at budget 0.15, then with bitsandbytes' dequantize instead of the fused 4-bit decode
#   4. the same on packed alpaca rows with flex attention (the shipped fast config's data path), without and with fp8
#   5. the 1B shape: the peer, then ours without and with fp8
#   run(command="bash benchmarks/gpu_fp8.sh", carry=[".whl/base", ".whl/peer_baseline.py", ".whl/tok",
#       ".whl/alpaca_en_demo.json"])
set -o pipefail
OUT=${OUT:-/tmp/gpu_fp8_out}
mkdir -p "$OUT"
M8=/tmp/rand-llama-8b-nf4
FAST=autocast,fused-ce,liger-ce,compile,selective:0,budget:0.2  # configs/alpaca_llama3_8b_fast.yaml's levers

peer() {  # $1 shape
  timeout 240 python3 .whl/peer_baseline.py --model $1 --bs 4 --seq 2048 --quant nf4 --gc 1 --steps 6 --warmup 2 \
    2>&1 | grep "^{" | tee -a "$OUT/peer.jsonl"
}

ours() {  # $1 name, $2 untimed leading variants, $3 variants, then speed.py's other arguments
  timeout ${SPEED_TIMEOUT:-420} python3 benchmarks/speed.py --warmup 3 --steps 8 --out "$OUT/$1.jsonl" \
    --first-measured $2 --variants $3 "${@:4}" > "$OUT/$1.log" 2>&1; echo "$1: exit $?"
  grep "^{" "$OUT/$1.log" | cut -c1-420 || tail -30 "$OUT/$1.log"
}

main() {
  . benchmarks/gpu_base_env.sh || return 1
  cp .whl/alpaca_en_demo.json /tmp/alpaca_en_demo.json
  timeout 120 python3 -m pytest -q -m gpu tests/unit/test_fp8.py -p no:cacheprovider -o addopts="" > "$OUT/pytest.txt" 2>&1
  echo "pytest test_fp8: exit $?"; grep -E "passed|failed|^E " "$OUT/pytest.txt" | head -20
  [ -f $M8/config.json ] || { timeout 150 python3 benchmarks/make_random_nf4.py --shape 8b $M8 2>&1 | grep "^{\|Error" || return 1; }
  peer 8b
  ours random8b 5 $FAST,fp8,budget:0.15,decode:bnb --model $M8 --profile 2
  ours packed8b 7 $FAST,packed,attn:flex_attention,fp8 --model $M8 --data /tmp/alpaca_en_demo.json --tokenizer $M8
  [ -n "$NO_1B" ] && return 0
  peer 1b
  ours random1b 5 $FAST,fp8 --model /tmp/rand-llama-1b --profile 2
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
