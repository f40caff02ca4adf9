#!/usr/bin/env bash
# Issue 8, one GPU: the peer loop (../shared/gpu/peer_baseline.py: plain transformers + peft + bitsandbytes,
# autocast bf16, full gradient checkpointing) and our training step lever by lever (benchmarks/speed.py),
# side by side on the same random-weight models, Llama-3-8B and 1B shapes, 4 x 2048 tokens.
#
# Wheels (bitsandbytes, pydantic, liger-kernel) and peer_baseline.py travel in .whl_speed/:
#   run(command="bash benchmarks/gpu_speed.sh", carry=[".whl_speed"])
source benchmarks/gpu_speed_env.sh
python3 -c "import torch, transformers, peft, bitsandbytes, liger_kernel, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'triton', triton.__version__)"
for shape in 8b 1b; do
  echo "=== peer $shape"
  timeout 200 python3 .whl_speed/peer_baseline.py --model $shape --bs 4 --seq 2048 --quant nf4 --gc 1 --steps 6 --warmup 2 \
    | tee -a "$OUT/peer.jsonl"
  echo "=== ours $shape"
  timeout 240 python3 benchmarks/speed.py --model /tmp/rand-llama-$shape --bs 4 --seq 2048 --steps 6 --warmup 2 \
    --variants fp32-residual,autocast,fused-ce,liger,selective:0.75,selective:0.5,selective:0.25,bs:8 \
    --out "$OUT/ours.jsonl"
done
