#!/usr/bin/env bash
# Issue 9, low-memory loading on one node: host RAM while 1 and then 2 processes load the same base through
# qlora.modeling at once (as 2 Ray Train workers on a node would; both onto the one GPU here), for the
# 70B-shape pre-quantized NF4 checkpoint and for the 8B shape quantized on load from bf16 safetensors.
#   run(command="bash benchmarks/gpu_host_ram.sh", carry=[".whl"])   (.whl/: see gpu_ray_overhead.sh)
set -o pipefail
OUT=${OUT:-/tmp/gpu_host_ram_out}
mkdir -p "$OUT"
M70=/tmp/rand-llama-70b-nf4
M8=/tmp/rand-llama-8b

loads() {  # $1 model, $2 strategy, $3 how many at once
  free -g | sed -n 2p
  for i in $(seq "$3"); do
    timeout 200 python3 benchmarks/host_ram_load.py --model "$1" --strategy "$2" > "$OUT/load_$i.txt" 2>&1 &
  done
  wait
  grep -h "^{" "$OUT"/load_*.txt || tail -20 "$OUT"/load_1.txt
  rm -f "$OUT"/load_*.txt
}

main() {
  . benchmarks/gpu_base_env.sh || return 1
  nproc
  [ -f $M70/config.json ] || timeout 240 python3 benchmarks/make_random_nf4.py --shape 70b $M70 2>&1 | grep "^{\|Error" || return 1
  echo "=== 70B NF4 checkpoint: one process, then two at once (fsdp: storage re-typed)"
  loads $M70 ddp 1
  loads $M70 fsdp 2
  rm -rf $M70
  make_random_8b $M8 || return 1
  echo "=== 8B bf16 checkpoint quantized on load: one process, then two at once"
  loads $M8 ddp 1
  loads $M8 ddp 2
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
