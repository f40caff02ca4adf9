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
  python3 - "$MODEL" <<'PY'
import gzip, os, shutil, sys, tempfile, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
path = sys.argv[1]
t = time.time()
with tempfile.TemporaryDirectory() as tok_dir:
    for f in ("chat_template.jinja", "tokenizer_config.json"):
        shutil.copy(f".whl/tok/{f}", tok_dir)
    with gzip.open(".whl/tok/tokenizer.json.gz", "rb") as src, open(f"{tok_dir}/tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    tok = AutoTokenizer.from_pretrained(tok_dir)
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
n = sum(p.numel() for p in model.parameters())
model.save_pretrained(path)  # safetensors
tok.save_pretrained(path)
print(f"saved {path}: {n/1e9:.3f}B params, tokenizer vocab {len(tok)}, {time.time()-t:.1f}s; files: {sorted(os.listdir(path))}")
PY
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
