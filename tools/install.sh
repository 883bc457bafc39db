#!/usr/bin/env bash
# Install what the project needs (add "test" to also install the test tools).
# CPU machines get the CPU build of torch (a plain `pip install torch` may pull a multi-GB CUDA
# build); machines with an NVIDIA driver get the default (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP "torch==$TORCH_VERSION"
  else
    # a local CPU wheel (find-links) if the machine has one, else PyTorch's CPU index, else PyPI
    $PIP --no-index "torch==$TORCH_VERSION" 2>/dev/null \
      || $PIP --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION" 2>/dev/null \
      || $PIP "torch==$TORCH_VERSION"
  fi
fi
quiet() {  # pip's own failure still fails the script; only its location / root warnings are hidden
  "$@" 2>&1 | { grep -v -E "^WARNING: (Location|Running pip)" || true; }
}
quiet $PIP -r requirements.txt
quiet $PIP --no-deps -e .  # megatron importable from anywhere: the tools need no sys.path edits
if [ "${1:-}" = "test" ]; then
  quiet $PIP -r tests/requirements.txt
fi
