#!/usr/bin/env bash
# GPU checks of the training jobs (issue 11): one line per check, PASS / FAIL / SKIP with the loss,
# the seconds and the peak GPU memory, through the project's own code (jobs.training.sft.run with a
# TrainSpec, jobs.training.grpo.run with a GrpoSpec) on a small Qwen2 built offline:
#   sft_lora_bf16        a bf16 LoRA SFT step
#   qlora_nf4_paged8bit  a QLoRA step: 4-bit NF4 base (bitsandbytes), paged 8-bit AdamW
#   deepspeed_zero2      a DeepSpeed ZeRO-2 step (bf16, full fine-tuning, one process)
#   grpo_lora_bf16       a bf16 GRPO step with LoRA (TRL's transformers rollouts)
#   grpo_arrays_*        GRPO over the arrays: a round of the demo model's samples generated with their
#                        log-probabilities and scored by the jobs' own code (jobs.generation.generate,
#                        jobs.scoring.rounds), then the training step on them with the importance
#                        correction, in three ways: lora_bf16, qlora_nf4 (4-bit NF4, paged 8-bit
#                        AdamW) and zero2 (DeepSpeed ZeRO-2, full fine-tuning)
# Each check runs 2 optimizer steps in a process of its own (150 s at most, 420 s for all): about
# a minute or two on one H200, well under 8 minutes.
#
# Usage:
#   bash tools/gpu_check.sh prepare [CHECK|GROUP ...] [--with-pyarrow] [--python-version 3.12] [--bnb-cuda 130]
#       Here, with registry access: puts into gpu_wheels/ (gitignored) the wheels the GPU machine
#       lacks, for its CPython 3.12: trl, datasets (+ dill, multiprocess, fsspec), pydantic (+ core,
#       annotated-types, typing-inspection, typing-extensions), orjson, submitit, peft, bitsandbytes
#       (only its CUDA 13.0 + CPU libraries: 41 MiB -> 3.4 MiB), and deepspeed (a wheel built here from
#       PyPI's sdist, PyPI has no wheel, with DS_BUILD_OPS=0: no CUDA needed; ops would be JIT-built
#       there, and ZeRO-2 with the trainer's torch AdamW needs none) with hjson (+ einops, msgpack,
#       ninja, py-cpuinfo, installed only where missing). Prints each size and the total with the
#       working tree against the device tool's 64 MiB: about 12 + 1 MiB, one call for all checks.
#       pyarrow (52 MiB) stays out unless --with-pyarrow: the machine has one (datasets 5.2 wants
#       >= 24; the INFO line prints its version); with it, carry one group per call (below).
#   bash tools/gpu_check.sh [run] [--cpu] [CHECK|GROUP ...]
#       There (no registry): pip-installs offline (--no-index --no-deps) under /tmp/gpu_check_site
#       ($GPU_CHECK_SITE) the carried wheels whose package the machine lacks or has in an unusable
#       version (WARN lines name any need left unmet); its torch, transformers, accelerate and (if
#       >= 0.21) peft are used as they are. <site>/common goes first on every check's PYTHONPATH;
#       bitsandbytes (<site>/bitsandbytes) only on the QLoRA check's, DeepSpeed and its needs
#       (<site>/deepspeed) only on the ZeRO-2 check's: accelerate imports DeepSpeed in every trainer
#       when it can, so a broken one would otherwise fail every check. Then runs the checks.
#       CHECK: sft qlora zero2 grpo arrays arrays_qlora arrays_zero2; GROUP: all (default),
#       sft_grpo_zero2, qlora, arrays. A check whose package is missing prints SKIP naming it.
#       Without a GPU every check prints SKIP "no GPU"; with --cpu the SFT and GRPO steps run in
#       fp32 on CPU through the jobs' CPU fallbacks (the QLoRA one too, reported as SKIP: it is not
#       4-bit there), a smoke test of this script's code path. Logs: $OUT/gpu_check_<check>.log when
#       OUT is set (the device tool's folder), else a temporary folder. Exit status 1 if one FAILed.
#
# With the device tool (one H200): first `bash tools/gpu_check.sh prepare` here, then
#   run(command="bash tools/gpu_check.sh run", carry=["gpu_wheels"], timeout_s=480)
# tools/gpu_check.* travel as untracked (or tracked) files; gpu_wheels/ is ignored, hence carried.
# Should pyarrow have to go too (the machine's older than 24 and datasets failing), two calls share
# the work: `prepare sft_grpo_zero2 --with-pyarrow` (61.1 MiB with the tree) + `run sft_grpo_zero2`,
# then `prepare qlora --with-pyarrow` (62.4 MiB) + `run qlora`.
# What cannot go: vLLM's GPU build (vllm + its CUDA kernels and pinned torch, hundreds of MiB), so
# grpo.vllm_mode (colocate / server) and generate.backend: vllm are not checked here.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
WHEELS=${GPU_CHECK_WHEELS:-gpu_wheels}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command=${1:-run}
[[ $# -gt 0 ]] && shift
case $command in
    prepare)
        exec "$PYTHON" tools/gpu_check.py prepare --wheels "$WHEELS" "$@"
        ;;
    run)
        if compgen -G "$WHEELS/*.whl" >/dev/null; then
            "$PYTHON" tools/gpu_check.py install --wheels "$WHEELS" --target "$SITE" ||
                echo "FAIL install of $WHEELS: the checks run with what got installed"
        else
            echo "INFO no $WHEELS/*.whl: the checks run with what the machine has"
            rm -rf "$SITE"
        fi
        exec "$PYTHON" tools/gpu_check.py run --site "$SITE" "$@"
        ;;
    -h|--help|help)
        sed -n '2,/^set -uo/p' "$0" | sed '$d'
        ;;
    *)
        echo "usage: bash tools/gpu_check.sh prepare|run [...] (see --help)" >&2
        exit 2
        ;;
esac
