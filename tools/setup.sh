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
