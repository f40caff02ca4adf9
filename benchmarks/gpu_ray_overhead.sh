#!/usr/bin/env bash
# Issue 9 on one GPU: (1) our training step without Ray (benchmarks/speed.py) and (2) the same settings as a
# Ray Train job submitted with `ray job submit` to a `ray start --head` cluster (token auth on), timed from
# the submit command to the first training step. Same random 1B-shape model, same packed alpaca data.
#   run(command="bash benchmarks/gpu_ray_overhead.sh", carry=[".whl"])
# .whl/ (git-ignored): ../shared/gpu/build-wheelhouse.sh .whl with EXTRA="pydantic sqlalchemy alembic", then
# base/ slimmed of what a tracking-off run never imports (sqlalchemy, alembic, mako, cryptography, cffi,
# pycparser, databricks_sdk, tzdata, gguf); .whl/tok/ SmolLM2's tokenizer (tokenizer.json gzipped);
# .whl/alpaca_en_demo.json from ../shared/data/llamafactory_demo; .whl/dash/: aiohttp-cors, opencensus,
# opencensus-context, opentelemetry-exporter-prometheus, colorful, smart_open, google-api-core,
# googleapis-common-protos, proto-plus, wrapt (pip download --no-deps).
set -o pipefail
OUT=${OUT:-/tmp/gpu_ray_overhead_out}
mkdir -p "$OUT"
M=/tmp/rand-llama-1b-v49k

main() {
  [ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/base/*.whl .whl/ray/*.whl || return 1
  # ray[default]'s dashboard deps (the job server needs them), in their own folder: opentelemetry is a
  # namespace package that pip --target would otherwise refuse to extend.
  [ -d /tmp/site-dash/google/rpc ] || python3 -m pip install -q --no-index --no-deps --no-compile --target \
    /tmp/site-dash .whl/dash/*.whl || return 1
  export PYTHONPATH=/tmp/site:/tmp/site-dash:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=token
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes, ray; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bnb', bitsandbytes.__version__, '| ray', ray.__version__)"
  cp .whl/alpaca_en_demo.json /tmp/alpaca_en_demo.json
  [ -f $M/config.json ] || python3 benchmarks/make_random_llama.py "$M" || return 1

  echo "=== without Ray: benchmarks/speed.py, same levers, packed alpaca rows"
  [ -n "$SKIP_NO_RAY" ] || timeout 150 python3 benchmarks/speed.py --model $M --data /tmp/alpaca_en_demo.json --tokenizer $M --steps 12 \
    --warmup 3 --variants autocast,fused-ce,liger,packed --out "$OUT/no_ray.jsonl" 2>&1 | grep "^{\|Error" | tail -4

  echo "=== ray start --head, then ray job submit (1 GPU worker)"
  [ -f ~/.ray/auth_token ] || ray get-auth-token --generate > /dev/null  # token auth: the cluster needs one
  ray start --head --num-gpus=1 --dashboard-host=127.0.0.1 --disable-usage-stats > "$OUT/ray_start.txt" 2>&1 \
    || { cat "$OUT/ray_start.txt"; return 1; }
  for i in 1 2; do  # the second submit finds the model files in the page cache and the worker pool warm
    timeout 200 python3 benchmarks/submit_timing.py --address http://127.0.0.1:8265 --log "$OUT/job$i.log" -- \
      --config $PWD/benchmarks/ray_overhead.yaml | tee -a "$OUT/submit.jsonl"
  done
  ray stop --force > /dev/null 2>&1
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
