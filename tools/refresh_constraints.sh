#!/usr/bin/env bash
# Refreshes tools/constraints.txt and tools/constraints-vllm.txt, the exact versions tools/setup.sh
# and tools/setup_vllm.sh install: both environments are built afresh in a scratch clone of this
# checkout, with the newest versions pip resolves today, and frozen. Your .venv and .venv-vllm are
# left alone. Then run the tests (bash .ci/run) before committing the two files.
#   bash tools/refresh_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git clone --quiet . "$scratch"
cp tools/setup.sh tools/setup_vllm.sh "$scratch/tools/"  # the scripts as they are here, committed or not
(cd "$scratch" && bash tools/setup.sh --refresh && bash tools/setup_vllm.sh --refresh)
cp "$scratch/tools/constraints.txt" "$scratch/tools/constraints-vllm.txt" tools/
git diff --stat -- tools/constraints.txt tools/constraints-vllm.txt
