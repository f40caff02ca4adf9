#!/usr/bin/env bash
# GPU run of the out-of-memory path and the adapter jobs: a micro-batch too big for the GPU fails at
# step 1 with the measured-memory message (exit 1); with train.auto_batch_size the same job halves the
# micro-batch (doubling accumulation) until it fits and trains; then ray_jobs.evaluate and
# ray_jobs.export --merge run on the GPU on the adapter it saved.
#
# Run on the offline GPU host from the repository root with .whl/ carried (see benchmarks/gpu_smoke.sh):
#   run(command="bash benchmarks/gpu_oom.sh", carry=[".whl"])
set -o pipefail
OUT=${OUT:-/tmp/gpu_oom_out}
mkdir -p "$OUT"
MODEL=/tmp/rand-llama-1b-v49k
DATA=/tmp/long_text.jsonl

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/base/*.whl .whl/ray/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 benchmarks/make_random_llama.py "$MODEL" || return 1
  python3 - "$MODEL" "$DATA" <<'PY'
import json, random, sys
from transformers import AutoTokenizer
path, data = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(path)
words = "river stone cloud amber lantern meadow harbor violet canyon ember signal orbit".split()
rng = random.Random(0)
with open(data, "w") as f:
    for _ in range(300):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2200))}) + "\n")
print("model and data ready; tokens in one record:", len(tok(open(data).readline())["input_ids"]))
PY
  local common=(--config benchmarks/gpu_oom.yaml --set model.name=$MODEL --set data.path=$DATA)
  echo "=== 1. micro-batch 64 x 2048 tokens, no auto_batch_size: expect exit 1 with the OOM message"
  timeout 240 python3 -m ray_jobs.train "${common[@]}" --set tracking.run_name=oom-plain
  echo "=== 1. exit code $?"
  echo "=== 2. same with train.auto_batch_size=true"
  local t0=$(date +%s)
  timeout 420 python3 -m ray_jobs.train "${common[@]}" --set train.auto_batch_size=true --set tracking.run_name=oom-auto \
    | tee /tmp/auto.log
  echo "=== 2. exit code $?, wall $(( $(date +%s) - t0 )) s"
  local ckpt=$(grep '^{' /tmp/auto.log | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin).get("checkpoint",""))')
  echo "=== 3. ray_jobs.evaluate on the GPU, adapter $ckpt"
  [ -n "$ckpt" ] && timeout 240 python3 -m ray_jobs.evaluate --adapter "$ckpt" --set data.eval_max_samples=16 \
    --set evaluation.num_generate=4
  echo "=== 3. exit code $?"
  echo "=== 4. ray_jobs.export --merge (bfloat16) on the GPU"
  [ -n "$ckpt" ] && timeout 240 python3 -m ray_jobs.export --adapter "$ckpt" --out /tmp/merged --merge --dtype bfloat16
  echo "=== 4. exit code $?"
}

main 2>&1 | grep -v "PlacementGroupCleaner" | tee "$OUT/log.txt"
grep '^{' "$OUT/log.txt" > "$OUT/json_lines.txt"
exit 0
