# Sourced by benchmarks/gpu_speed*.sh on the GPU host: installs the wheels carried in .whl_speed/
# (bitsandbytes, pydantic, liger-kernel) into /tmp/site and sets the environment; $OUT collects results.
set -o pipefail
OUT=${OUT:-/tmp/gpu_speed_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl_speed/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
