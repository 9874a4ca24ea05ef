#!/usr/bin/env bash
# Creates .venv and installs selftrain into it (editable, with the dev tools), at the exact versions
# of tools/constraints.txt (the ones CI passes with; refresh them with tools/refresh_constraints.sh).
# CPU torch goes in first and alone: anything that depends on torch would otherwise pull the
# multi-GB CUDA build on a machine without a GPU.
#   bash tools/setup.sh              pinned (the default)
#   bash tools/setup.sh --refresh    newest versions pip resolves today, written to tools/constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
CONSTRAINTS=(-c tools/constraints.txt)
case "${1:-}" in
  "") ;;
  --refresh) CONSTRAINTS=(); rm -rf .venv ;;
  *) echo "usage: bash tools/setup.sh [--refresh]" >&2; exit 2 ;;
esac
pip_install() { .venv/bin/python -m pip install --quiet ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} "$@"; }
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
pip_install "torch==2.13.0"
pip_install -e ".[dev]"
# torchvision, for the processors of vision-language models (Qwen2-VL's video processor needs it).
# A workaround: the torchvision built for torch 2.13 (0.28) is a CUDA build that does not load
# beside CPU torch ("operator torchvision::nms does not exist"); 0.16.2 is the newest that imports.
# Its compiled ops (nms, roi_align, video decoding) are missing, and nothing here calls them.
# --no-deps: its pin (torch==2.1.2) would replace the CPU torch with a CUDA one; requests is the
# dependency it imports. On a GPU cluster install the torchvision that matches your torch instead.
if ! .venv/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  pip_install requests
  pip_install --no-deps "torchvision==0.16.2"
  .venv/bin/python -W ignore -c "import torch, torchvision; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
fi
if [ ${#CONSTRAINTS[@]} -eq 0 ]; then
  # Local version labels (+cpu) dropped: "torch==2.13.0" matches the CPU build and the CUDA one.
  .venv/bin/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$//' > tools/constraints.txt
  echo "wrote tools/constraints.txt ($(wc -l < tools/constraints.txt) packages)"
fi
