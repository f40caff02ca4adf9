#!/usr/bin/env bash
# Issue 21 on one H200: the real job's stalls and its throughput by the clock.
#   1. `ray job submit` of configs/alpaca_llama3_8b_fast.yaml as shipped (random Llama-3-8B-shape NF4 weights,
#      packed alpaca rows, several epochs), train.log_every=1, generation and tracking off, TORCH_LOGS=recompiles
#      in the workers' environment; benchmarks/submit_timing.py prints the median window, the slow windows, the
#      recompiles and the job's throughput by the clock (its last JSON line).
#   2. benchmarks/speed.py with the same settings: random tokens (the reference step), then packed real
#      rows, then packed rows with flex attention (VARIANTS to change).
#   PARTS="compiled compiled-sdpa eager": jobs to run (default compiled: the shipped config, STEPS=100;
#   compiled-sdpa: the same with sdpa attention; eager: no compile, full checkpointing, EAGER_STEPS=60)
#   PYTEST=1: pytest -m gpu first; NO_SPEED=1: no speed.py
#   run(command="bash benchmarks/gpu_stalls.sh", carry=[".whl"])
# .whl/ (git-ignored): ../shared/gpu/build-wheelhouse.sh .whl; pydantic's wheels in base/ (without
# cryptography, cffi, pycparser, databricks_sdk, tzdata: a tracking-off run never imports them); .whl/dash/, .whl/tok/
# and .whl/alpaca_en_demo.json as benchmarks/gpu_ray_overhead.sh describes.
set -o pipefail
OUT=${OUT:-/tmp/gpu_stalls_out}
mkdir -p "$OUT"
M8=/tmp/rand-llama-8b-nf4
PARTS=${PARTS:-compiled}

main() {
  . benchmarks/gpu_ray_env.sh || return 1
  ray get-auth-token --generate > /dev/null
  [ -f $M8/config.json ] || { timeout 150 python3 benchmarks/make_random_nf4.py --shape 8b $M8 2>&1 | grep "^{\|Error" || return 1; }
  if [ -n "$PYTEST" ]; then
    timeout 300 python3 -m pytest -m gpu -q tests/unit/test_gpu.py -p no:cacheprovider -o addopts="" > "$OUT/pytest_gpu.txt" 2>&1
    echo "pytest -m gpu: exit $?"; grep -E "passed|failed|Error|^E " "$OUT/pytest_gpu.txt" | head -20
  fi
  TORCH_LOGS=recompiles ray start --head --num-gpus=1 --dashboard-host=127.0.0.1 --disable-usage-stats \
    > "$OUT/ray_start.txt" 2>&1 || { cat "$OUT/ray_start.txt"; return 1; }
  for part in $PARTS; do
    local job="--set model.name=$M8 --set data.path=/tmp/alpaca_en_demo.json --set train.log_every=1
      --set evaluation.generate=false --set tracking.enabled=false --set scaling.storage_path=/tmp/qlora-runs
      --set tracking.run_name=stalls-$part"
    case $part in
      compiled) job="$job --set train.max_steps=${STEPS:-100}" ;;
      compiled-sdpa) job="$job --set train.max_steps=${STEPS:-100} --set model.attn_implementation=sdpa" ;;
      eager) job="$job --set train.max_steps=${EAGER_STEPS:-60} --set train.compile=false
        --set train.compile_memory_budget=null --set train.gradient_checkpointing=true --set model.attn_implementation=sdpa" ;;
    esac
    echo "=== job $part"
    timeout ${JOB_TIMEOUT:-240} python3 benchmarks/submit_timing.py --address http://127.0.0.1:8265 --log "$OUT/job_$part.log" \
      -- --config $PWD/configs/alpaca_llama3_8b_fast.yaml $job | tee "$OUT/job_$part.json"
  done
  ray stop --force > /dev/null 2>&1
  [ -n "$NO_SPEED" ] && return 0
  timeout ${SPEED_TIMEOUT:-240} python3 benchmarks/speed.py --model $M8 --data /tmp/alpaca_en_demo.json --tokenizer $M8 \
    --warmup 3 --steps 10 --first-measured 5 --out "$OUT/speed.jsonl" \
    --variants ${VARIANTS:-autocast,fused-ce,liger-ce,compile,selective:0,budget:0.2,packed,attn:flex_attention} \
    > "$OUT/speed.log" 2>&1; echo "speed.py: exit $?"
  grep "^{" "$OUT/speed.log" | cut -c1-330 || tail -20 "$OUT/speed.log"
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
