#!/usr/bin/env bash
# GPU smoke benchmark: the real train job (ray_jobs.train, local Ray cluster, 1 GPU worker) on a
# random-weight Llama 1B-shape model in NF4, then the peer baseline loop on the same host.
#
# Run on the offline GPU host from the repository root, with .whl/ carried (device tool:
#   run(command="bash benchmarks/gpu_smoke.sh", carry=[".whl"])  -- OUT is set there; elsewhere it
#   defaults to /tmp/gpu_smoke_out).
# .whl/ is built here (CPU machine) and is git-ignored:
#   ../shared/gpu/build-wheelhouse.sh .whl  with EXTRA="pydantic sqlalchemy alembic"
#       (pydantic: not in the GPU image; sqlalchemy + alembic: mlflow-skinny's sqlite store)
#   then, to keep one transfer under 64 MiB: liger_kernel and gguf wheels removed (unused here),
#   ray/serve and ray/llm deleted from the ray wheel (zip -d);
#   .whl/tok/: SmolLM2-135M-Instruct's tokenizer files (tokenizer.json gzipped) from ~/.cache/qlora/gguf/<hash>/;
#   .whl/peer_baseline.py: a copy of ../shared/gpu/peer_baseline.py.
set -o pipefail
OUT=${OUT:-/tmp/gpu_smoke_out}
mkdir -p "$OUT"
MODEL=/tmp/rand-llama-1b-v49k   # not /tmp/rand-llama-1b: peer_baseline.py owns that path (vocab 128256)

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/base/*.whl .whl/ray/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

  echo "=== host"
  date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 - <<'PY'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0))
for m in ("transformers", "peft", "accelerate", "bitsandbytes", "ray", "mlflow", "pydantic", "datasets", "sqlalchemy"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "IMPORT FAILED:", type(e).__name__, e)
PY

  echo "=== random-weight Llama 1B shape (vocab 49152, SmolLM2 tokenizer) -> $MODEL"
  python3 benchmarks/make_random_llama.py "$MODEL"
  echo "=== our job: ray_jobs.train"
  local t0=$(date +%s)
  [ -f "$MODEL/config.json" ] && timeout 330 python3 -m ray_jobs.train --config benchmarks/gpu_smoke.yaml \
    --set model.name=$MODEL --set scaling.use_gpu=true --set scaling.num_workers=1 \
    --set tracking.uri=sqlite:////tmp/mlflow.db
  local rc=$?
  echo "=== train exit code $rc, wall $(( $(date +%s) - t0 )) s"
  if [ $rc -ne 0 ]; then
    tar czf "$OUT/ray_logs.tgz" -C /tmp/ray session_latest/logs 2>/dev/null
  fi

  echo "=== peer baseline (same host, same call)"
  timeout 180 python3 .whl/peer_baseline.py --model 1b --bs 4 --seq 2048 --quant nf4 --gc 1
  echo "=== peer exit code $?"
  nvidia-smi --query-gpu=name,memory.used --format=csv
}

main 2>&1 | tee "$OUT/log.txt"
grep '^{' "$OUT/log.txt" > "$OUT/json_lines.txt"
exit 0
