#!/usr/bin/env bash
# Issue 9 on 2 x H200 (nvidia-h200-x2): Ray Train jobs submitted with `ray job submit` to a `ray start --head`
# cluster of 2 GPUs, timed by benchmarks/submit_timing.py (tokens/s over all workers, every rank's peak GPU
# memory, seconds from submit to the first step), with nvidia-smi sampling both GPUs beside each job.
#   PART=scaling: DDP at 1 and 2 workers (1B shape, 8B shape).
#   PART=8b:      the 8B shape at 2 workers with fsdp, then deepspeed (ZeRO-2).
#   PART=70b:     the Llama-3-70B shape (random NF4 checkpoint, benchmarks/make_random_nf4.py) at 2 workers
#                 with fsdp (then ddp, with NO_DDP_70B unset and time left).
#   PART=compile: (one GPU is enough) the GPU-marked tests, then the 8B shape at 1 worker with train.compile
#                 and compile_memory_budget=0.2, no whole-layer checkpointing (issue 8's fastest setting).
#   run(command="PART=scaling bash benchmarks/gpu_multi.sh", kind="nvidia-h200-x2", carry=[".whl"])
# Same settings as benchmarks/ray_overhead.yaml (NF4, LoRA r=16 all linear, alpaca packed into 2048-token
# rows, fused loss + Liger, full checkpointing); the batch is per worker, so 2 workers take twice the rows.
set -o pipefail
OUT=${OUT:-/tmp/gpu_multi_out}
mkdir -p "$OUT"
M1=/tmp/rand-llama-1b-v49k
M8=/tmp/rand-llama-8b-nf4
M70=/tmp/rand-llama-70b-nf4

job() {  # $1 name, then --set overrides for benchmarks/ray_overhead.yaml
  local name=$1; shift
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/smi_$name.csv" &
  local smi=$!
  timeout ${JOB_TIMEOUT:-240} python3 benchmarks/submit_timing.py --address http://127.0.0.1:8265 --log "$OUT/$name.log" -- \
    --config $PWD/benchmarks/ray_overhead.yaml "$@" | sed "s/^{/{\"name\": \"$name\", /" | tee -a "$OUT/jobs.jsonl"
  kill $smi
  # the most each GPU held during the job (MiB, as nvidia-smi counts: allocator reserve and CUDA context too)
  awk -F', ' '{if ($2 > m[$1]) m[$1] = $2} END {for (g in m) printf "  nvidia-smi max GPU%s: %d MiB\n", g, m[g]}' "$OUT/smi_$name.csv"
}

estimate() {  # the --dry-run estimate per worker for the same settings
  timeout 120 python3 -m ray_jobs.train --config benchmarks/ray_overhead.yaml "$@" --dry-run 2>&1 | grep "GPU memory per worker\|  = weights"
}

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/base/*.whl .whl/ray/*.whl .whl/ds/*.whl || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-dash .whl/dash/*.whl || return 1
  export PYTHONPATH=/tmp/site:/tmp/site-dash:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=token RAY_DEDUP_LOGS=0
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | sed -n 2p
  nvidia-smi topo -m | head -4
  python3 -c "import torch, transformers, peft, bitsandbytes, ray; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bnb', bitsandbytes.__version__, '| ray', ray.__version__, '| nccl', torch.cuda.nccl.version())"
  cp .whl/alpaca_en_demo.json /tmp/alpaca_en_demo.json
  ray get-auth-token --generate > /dev/null
  [ "$PART" = scaling ] && { python3 benchmarks/make_random_llama.py $M1 | tail -1 || return 1; }
  [ "$PART" = 70b ] && { timeout 240 python3 benchmarks/make_random_nf4.py --shape 70b $M70 2>&1 | grep "^{\|Error" || return 1; }
  [ "$PART" = 70b ] || [ -f $M8/config.json ] || { timeout 120 python3 benchmarks/make_random_nf4.py --shape 8b $M8 2>&1 | grep "^{\|Error" || return 1; }
  S8="--set model.name=$M8 --set train.max_steps=10"
  if [ "$PART" = compile ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/test/*.whl || return 1
    timeout 240 python3 -m pytest -m gpu -q tests/unit/test_gpu.py -p no:cacheprovider -o addopts="" > "$OUT/pytest_gpu.txt" 2>&1
    echo "pytest -m gpu: exit $?"; grep -E "passed|failed|Error|^E " "$OUT/pytest_gpu.txt" | head -20
  fi
  ray start --head --num-gpus=$(nvidia-smi -L | wc -l) --dashboard-host=127.0.0.1 --disable-usage-stats > "$OUT/ray_start.txt" 2>&1 \
    || { cat "$OUT/ray_start.txt"; return 1; }
  if [ "$PART" = scaling ]; then
    job 1b_ddp_w1 --set scaling.num_workers=1
    job 1b_ddp_w2 --set scaling.num_workers=2
    job 8b_ddp_w1 $S8 --set scaling.num_workers=1
    job 8b_ddp_w2 $S8 --set scaling.num_workers=2
  elif [ "$PART" = compile ]; then
    C8="$S8 --set scaling.num_workers=1 --set train.compile=true --set train.gradient_checkpointing=false"
    job 8b_compile_budget_w1 $C8 --set train.compile_memory_budget=0.2
    echo "estimate 8b compile budget 0.2:"; estimate $C8 --set train.compile_memory_budget=0.2
  elif [ "$PART" = 8b ]; then
    job 8b_fsdp_w2 $S8 --set scaling.num_workers=2 --set scaling.strategy=fsdp
    job 8b_deepspeed_w2 $S8 --set scaling.num_workers=2 --set scaling.strategy=deepspeed
    for s in ddp fsdp deepspeed; do echo "estimate 8b $s w2:"; estimate $S8 --set scaling.num_workers=2 --set scaling.strategy=$s; done
  else
    S70="--set model.name=$M70 --set train.max_steps=6 --set train.batch_size=2 --set data.eval_max_samples=4"
    JOB_TIMEOUT=300 job 70b_fsdp_w2 $S70 --set scaling.num_workers=2 --set scaling.strategy=fsdp
    echo "estimate 70b fsdp w2:"; estimate $S70 --set scaling.num_workers=2 --set scaling.strategy=fsdp
    [ -n "$NO_DDP_70B" ] || JOB_TIMEOUT=300 job 70b_ddp_w2 $S70 --set scaling.num_workers=2
  fi
  ray stop --force > /dev/null 2>&1
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
