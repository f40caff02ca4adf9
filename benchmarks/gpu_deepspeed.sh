#!/usr/bin/env bash
# Issue 9 on one H200: scaling.strategy=deepspeed's CUDA path (a ZeRO-2 engine on a one-rank NCCL group, fp32
# mode under bf16 autocast) against the DDP path, same random weights and batches (benchmarks/fsdp_check.py),
# on the 1B shape (Liger + fused loss) and the Llama-3-8B shape (random NF4 checkpoint).
# First the GPU-marked tests (tests/unit/test_gpu.py: pytest -m gpu).
#   run(command="bash benchmarks/gpu_deepspeed.sh", carry=[".whl"])   (.whl/: see gpu_ray_overhead.sh; .whl/ds:
#   pip wheel --no-deps deepspeed==0.19.8 einops hjson ninja py-cpuinfo + msgpack for cp312; .whl/test: pytest,
#   pluggy, iniconfig)
set -o pipefail
OUT=${OUT:-/tmp/gpu_deepspeed_out}
mkdir -p "$OUT"
M1=/tmp/rand-llama-1b-v49k
M8=/tmp/rand-llama-8b-nf4

main() {
  . benchmarks/gpu_base_env.sh || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/ds/*.whl .whl/test/*.whl || return 1
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  echo "=== pytest -m gpu"
  timeout 240 python3 -m pytest -m gpu -q tests/unit/test_gpu.py -p no:cacheprovider > "$OUT/pytest_gpu.txt" 2>&1; echo "exit $?"
  grep -E "passed|failed|Error|^E " "$OUT/pytest_gpu.txt" | head -30
  [ -f $M1/config.json ] || python3 benchmarks/make_random_llama.py "$M1" | tail -1 || return 1
  [ -f $M8/config.json ] || timeout 120 python3 benchmarks/make_random_nf4.py --shape 8b $M8 2>&1 | grep "^{\|Error" || return 1
  echo "=== 1B shape, Liger + fused loss"
  timeout 200 python3 benchmarks/fsdp_check.py --model $M1 --steps 10 --kernels liger --fused --strategies ddp,deepspeed \
    --out "$OUT/1b.jsonl" > "$OUT/1b.log" 2>&1; echo "exit $?"
  grep "^{" "$OUT/1b.log" | cut -c1-1500 || tail -30 "$OUT/1b.log"
  echo "=== Llama-3-8B shape (NF4 checkpoint), Liger + fused loss"
  timeout 240 python3 benchmarks/fsdp_check.py --model $M8 --steps 8 --kernels liger --fused --strategies ddp,deepspeed \
    --out "$OUT/8b.jsonl" > "$OUT/8b.log" 2>&1; echo "exit $?"
  grep "^{" "$OUT/8b.log" | cut -c1-1500 || tail -30 "$OUT/8b.log"
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
