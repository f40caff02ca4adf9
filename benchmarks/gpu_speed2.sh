#!/usr/bin/env bash
# Issue 8, second GPU call: the 8B shape at the peer's memory (selective checkpointing 0.85), torch.compile
# of the decoder layers, and real instruction data (alpaca_en_demo, SmolLM2 tokenizer): the peer's padded
# loop (4 examples padded to the longest) against our packing (4 rows of 2048 tokens), useful tokens/s.
#
# .whl_speed/ carries the wheels, peer_baseline.py, alpaca_en_demo.json (../shared/data/llamafactory_demo)
# and tok/ (SmolLM2's tokenizer):  run(command="bash benchmarks/gpu_speed2.sh", carry=[".whl_speed"])
source benchmarks/gpu_speed_env.sh
M=/tmp/rand-llama-8b
echo "=== peer 8b (also saves the random model)"
timeout 200 python3 .whl_speed/peer_baseline.py --model 8b --bs 4 --seq 2048 --quant nf4 --gc 1 --steps 6 --warmup 2 \
  | tee -a "$OUT/peer.jsonl"
echo "=== ours 8b at the peer's memory"
timeout 150 python3 benchmarks/speed.py --model $M --variants autocast,fused-ce,liger,selective:0.85 --out "$OUT/ours.jsonl"
echo "=== real data: peer-style padded loop, then our levers with packing"
timeout 150 python3 benchmarks/speed.py --model $M --data .whl_speed/alpaca_en_demo.json --tokenizer .whl_speed/tok \
  --variants autocast,fused-ce,liger,packed,selective:0.85 --out "$OUT/real.jsonl"
echo "=== torch.compile of the decoder layers"
timeout 220 python3 benchmarks/speed.py --model $M --variants autocast,fused-ce,liger,compile --out "$OUT/compile.jsonl"
