#!/usr/bin/env bash
# Rewrite constraints/lock.txt from the packages installed in a venv (default .venv), after the whole suite passed
# there: `VENV=.venv-latest ./scripts/setup.sh --dev --latest && VENV=.venv-latest .venv-latest/bin/python -m pytest -q
# && VENV=.venv-latest ./scripts/lock.sh`. layerprobe itself (editable) is left out; torch loses its local label
# (+cpu), so the pin also matches the build a GPU machine installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
out=constraints/lock.txt
tmp=$(mktemp "$out.XXXXXX")
{
  sed -n '1,/^pip==/p' "$out" | grep '^#'
  echo "pip==$("$VENV/bin/pip" --version | cut -d' ' -f2)"
  "$VENV/bin/pip" freeze --exclude-editable 2>/dev/null | grep -v -E '^(layerprobe|-e )' | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > "$tmp"
mv "$tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") pins)"
