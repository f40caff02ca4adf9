# Sourced (inside main) by the GPU scripts that submit Ray jobs (gpu_stalls.sh, gpu_first_step.sh): installs .whl/base,
# .whl/ray and ray[default]'s dashboard deps (.whl/dash: the job server needs them) into /tmp/site and /tmp/site-dash,
# sets the offline environment with Ray token auth, prints the host and the versions, copies the alpaca demo data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/base/*.whl .whl/ray/*.whl || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-dash .whl/dash/*.whl || return 1
export PYTHONPATH=/tmp/site:/tmp/site-dash:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=token RAY_DEDUP_LOGS=0
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, transformers, peft, bitsandbytes, ray; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bnb', bitsandbytes.__version__, '| ray', ray.__version__)"
cp .whl/alpaca_en_demo.json /tmp/alpaca_en_demo.json
