#!/usr/bin/env bash
# Preference tuning on one H200 (issue 19): configs/dpo_llama3_8b_ultrafeedback.yaml on a random Llama-3-8B-shape
# NF4 checkpoint, with the pairs built from alpaca_en_demo (prompt = instruction + input, chosen = its output,
# rejected = the next record's output: realistic lengths; rewards on random weights mean nothing), beside TRL's
# DPOTrainer with the same settings (benchmarks/trl_dpo_peer.py).
#   PARTS="pytest dryrun dpo orpo dpo16 trl trl16" (default all): pytest -m gpu (PYTEST_K: its -k); --dry-run's
#   estimate; our DPO job; ORPO; DPO in micro-batches of 16 pairs, no accumulation (the same global batch); TRL
#   with the config's settings; TRL in micro-batches of 16. DRYRUN_SET: more --set for the dry run
#   run(command="bash benchmarks/gpu_preference.sh", carry=[".whl"])
# .whl/ (git-ignored): ../shared/gpu/build-wheelhouse.sh .whl, plus pydantic 2.14.4, pydantic_core 2.50.5,
# annotated-types, typing-inspection and trl 1.16.0 (pip download --no-deps --python-version 3.12
# --platform manylinux2014_x86_64 --only-binary=:all: -d .whl/base), without cryptography, cffi, pycparser,
# databricks_sdk, tzdata; .whl/tok/ SmolLM2's tokenizer (tokenizer.json gzipped); .whl/alpaca_en_demo.json.
set -o pipefail
OUT=${OUT:-/tmp/gpu_preference_out}
mkdir -p "$OUT"
M8=/tmp/rand-llama-8b-nf4
PARTS=${PARTS:-pytest dryrun dpo orpo dpo16 trl trl16}
STEPS=${STEPS:-20}

make_pairs() {
  python3 - <<'EOF'
import json
rows = json.load(open(".whl/alpaca_en_demo.json"))
with open("/tmp/pairs.jsonl", "w") as f:
    for r, other in zip(rows, rows[1:] + rows[:1]):
        prompt = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        f.write(json.dumps({"prompt": prompt, "chosen": r["output"], "rejected": other["output"]}) + "\n")
print("pairs:", len(rows))
EOF
}

main() {
  [ -d /tmp/site/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/base/*.whl .whl/ray/*.whl || return 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, bitsandbytes, ray, trl; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bnb', bitsandbytes.__version__, '| ray', ray.__version__, '| trl', trl.__version__)"
  [ -f $M8/config.json ] || { timeout 200 python3 benchmarks/make_random_nf4.py --shape 8b $M8 2>&1 | grep "^{\|Error" || return 1; }
  make_pairs
  local job="--config configs/dpo_llama3_8b_ultrafeedback.yaml --set model.name=$M8 --set data.path=/tmp/pairs.jsonl
    --set data.split=train --set data.eval_path=null --set data.eval_split=null --set data.eval_fraction=0.05
    --set data.eval_max_samples=48 --set train.max_steps=$STEPS --set train.log_every=1 --set evaluation.generate=false
    --set tracking.enabled=false --set scaling.storage_path=/tmp/qlora-runs"
  for part in $PARTS; do
    echo "=== $part $(date -u +%T)"
    case $part in
      pytest) timeout 300 python3 -m pytest -m gpu -q tests/unit/test_gpu.py -p no:cacheprovider -o addopts="" ${PYTEST_K:+-k "$PYTEST_K"} \
                > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest -m gpu: exit $?"
              grep -E "passed|failed|Error|^E " "$OUT/pytest_gpu.txt" | head -20 ;;
      dryrun) timeout 120 python3 -m ray_jobs.train $job $DRYRUN_SET --dry-run > "$OUT/dryrun.txt" 2>&1; echo "exit $?"
              grep -v "^{" "$OUT/dryrun.txt" | tail -25 ;;
      dpo|orpo) timeout 330 python3 -m ray_jobs.train $job --set preference.loss=$part --set tracking.run_name=gpu-$part \
                  > "$OUT/$part.txt" 2>&1; echo "exit $?"
                grep -E "\[qlora\] (step|before|after|held-out)|error" "$OUT/$part.txt" | cut -c1-260 | tail -14
                tail -1 "$OUT/$part.txt" | cut -c1-1500 ;;
      dpo16) timeout 330 python3 -m ray_jobs.train $job --set train.batch_size=16 --set train.gradient_accumulation=1 \
               --set tracking.run_name=gpu-dpo16 > "$OUT/$part.txt" 2>&1; echo "exit $?"
             grep -E "\[qlora\] step" "$OUT/$part.txt" | cut -c1-200 | tail -6; tail -1 "$OUT/$part.txt" | cut -c1-1500 ;;
      trl16) timeout 300 python3 benchmarks/trl_dpo_peer.py --model $M8 --data /tmp/pairs.jsonl --steps $STEPS \
               --batch-size 16 --accumulation 1 > "$OUT/trl16.txt" 2>&1; echo "exit $?"
             grep "^{" "$OUT/trl16.txt" || tail -30 "$OUT/trl16.txt" ;;
      trl) timeout 300 python3 benchmarks/trl_dpo_peer.py --model $M8 --data /tmp/pairs.jsonl --steps $STEPS \
             > "$OUT/trl.txt" 2>&1; echo "exit $?"; grep "^{" "$OUT/trl.txt" || tail -30 "$OUT/trl.txt" ;;
    esac
  done
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
