# Sourced (inside main) by the issue-9 GPU scripts (gpu_fsdp*.sh, gpu_host_ram.sh): installs the wheels of
# .whl/base/ (see gpu_ray_overhead.sh) into /tmp/site, sets the offline environment, prints the host, and
# defines make_random_8b FOLDER (the Llama-3-8B shape with random bf16 weights, written unless present).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/base/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bnb', bitsandbytes.__version__)"

make_random_8b() {
  [ -f "$1/config.json" ] || timeout 150 python3 - "$1" <<'PY'
import sys, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
t = time.time()
with torch.device("cuda"):
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(sys.argv[1], max_shard_size="5GB")
print(f"saved the 8B shape in {time.time() - t:.0f} s", flush=True)
PY
}
