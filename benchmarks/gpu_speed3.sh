#!/usr/bin/env bash
# Issue 8, third GPU call: real instruction data (alpaca_en_demo, SmolLM2 tokenizer) on the 8B shape: the
# peer-style padded loop (4 examples padded to the longest, autocast, full checkpointing) against our levers
# with packing (4 rows of 2048 tokens); and compile + selective checkpointing at the peer's memory.
#   run(command="bash benchmarks/gpu_speed3.sh", carry=[".whl_speed"])
source benchmarks/gpu_speed_env.sh
M=/tmp/rand-llama-8b
timeout 200 python3 .whl_speed/peer_baseline.py --model 8b --bs 4 --seq 2048 --quant nf4 --gc 1 --steps 6 --warmup 2 \
  | tee -a "$OUT/peer.jsonl"
echo "=== real data"
timeout 200 python3 benchmarks/speed.py --model $M --data .whl_speed/alpaca_en_demo.json --tokenizer .whl_speed/tok \
  --variants autocast,fused-ce,liger,packed,compile --out "$OUT/real.jsonl" 2>&1 | grep -v "^W1123\|^W11" | tail -20
echo "=== compile + selective"
timeout 200 python3 benchmarks/speed.py --model $M --variants autocast,fused-ce,liger,compile,selective:0.85 \
  --out "$OUT/compile_selective.jsonl" 2>&1 | grep "^{\|Error" | tail -5
