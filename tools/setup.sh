#!/usr/bin/env bash
# Creates .venv and installs selftrain into it (editable, with the dev tools).
# CPU torch goes in first and alone: anything that depends on torch would otherwise pull the
# multi-GB CUDA build on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# torchvision, for the processors of vision-language models (Qwen2-VL's video processor needs it).
# A workaround: the torchvision built for torch 2.13 (0.28) is a CUDA build that does not load
# beside CPU torch ("operator torchvision::nms does not exist"); 0.16.2 is the newest that imports.
# Its compiled ops (nms, roi_align, video decoding) are missing, and nothing here calls them.
# --no-deps: its pin (torch==2.1.2) would replace the CPU torch with a CUDA one; requests is the
# dependency it imports. On a GPU cluster install the torchvision that matches your torch instead.
if ! .venv/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet requests
  .venv/bin/python -m pip install --quiet --no-deps "torchvision==0.16.2"
  .venv/bin/python -W ignore -c "import torch, torchvision; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
fi
