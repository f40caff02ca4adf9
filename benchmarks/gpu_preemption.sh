#!/usr/bin/env bash
# Issue 20 on one GPU: what a preemption notice costs the 8B job. configs/alpaca_llama3_8b_fast.yaml as shipped on
# a random Llama-3-8B-shape NF4 checkpoint and packed alpaca rows (generation and tracking off), SIGTERM to its Ray
# Train worker once it logs step AT_STEP (benchmarks/preemption_timing.py): notice -> checkpoint written and
# registered, -> worker gone, -> run resumed, -> next step; the checkpoint's size.
#   PARTS="pytest notice" (default both): pytest -m gpu (the GPU paths after a change), then the notice run.
#   run(command="bash benchmarks/gpu_preemption.sh", carry=[".whl"])
# .whl/ (git-ignored): ../shared/gpu/build-wheelhouse.sh .whl with EXTRA="pydantic==2.12.5", without the
# cryptography, cffi, pycparser, databricks_sdk, tzdata, google_auth and pyasn1 wheels (a tracking-off run never
# imports them); .whl/tok/ SmolLM2's tokenizer (tokenizer.json gzipped, for make_random_nf4.py);
# .whl/alpaca_en_demo.json from ../shared/data/llamafactory_demo.
set -o pipefail
OUT=${OUT:-/tmp/gpu_preemption_out}
mkdir -p "$OUT"
M8=/tmp/rand-llama-8b-nf4
PARTS=${PARTS:-pytest notice}

main() {
  [ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/base/*.whl .whl/ray/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, transformers, peft, bitsandbytes, ray; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bnb', bitsandbytes.__version__, '| ray', ray.__version__)"
  cp .whl/alpaca_en_demo.json /tmp/alpaca_en_demo.json
  [ -f $M8/config.json ] || { timeout 200 python3 benchmarks/make_random_nf4.py --shape 8b $M8 2>&1 | grep "^{\|Error" || return 1; }
  for part in $PARTS; do
    echo "=== $part $(date -u +%T)"
    case $part in
      pytest) timeout 300 python3 -m pytest -m gpu -q tests/unit/test_gpu.py -p no:cacheprovider -o addopts="" \
                > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest -m gpu: exit $?"
              grep -E "passed|failed|Error|^E " "$OUT/pytest_gpu.txt" | head -20 ;;
      notice) timeout ${JOB_TIMEOUT:-420} python3 benchmarks/preemption_timing.py --at-step ${AT_STEP:-15} \
                --log "$OUT/notice.log" -- --config configs/alpaca_llama3_8b_fast.yaml --set model.name=$M8 \
                --set data.path=/tmp/alpaca_en_demo.json --set train.max_steps=${STEPS:-30} --set train.log_every=1 \
                --set data.eval_max_samples=16 --set evaluation.generate=false --set tracking.enabled=false \
                --set scaling.storage_path=/tmp/qlora-runs --set tracking.run_name=notice-$(date +%s)
              echo "exit $?"; grep -aE "\[qlora\] (step|preemption|resumed|held-out)|rror" "$OUT/notice.log" | cut -c1-230 ;;
    esac
  done
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
