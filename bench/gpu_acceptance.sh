#!/usr/bin/env bash
# The GPU acceptance check: one command, at most 9 minutes on one H100/H200, everything into one JSON.
#   bench/gpu_acceptance.sh [OUT_DIR]          on a GPU machine (default OUT_DIR: gpu_acceptance)
#   bench/gpu_acceptance.sh --dry [OUT_DIR]    the same steps on this CPU with a tiny model (tests run this)
# Steps (bench/gpu_acceptance.py): the GPU-marked tests; an 8B-shaped QLoRA run (random weights, packed
# 2,048-token rows) beside TRL's SFTTrainer on the same samples (bench/vs_hf.py), with allocated and
# reserved peaks and tokens/s against the plan and MFU against the GPU's peak. OUT_DIR/acceptance.json
# is rewritten after each step, so a step cut short leaves the earlier ones' figures.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=()
if [[ "${1:-}" == "--dry" ]]; then
  dry=(--dry)
  shift
fi
exec "${PYTHON:-python}" bench/gpu_acceptance.py "${dry[@]}" --out "${1:-gpu_acceptance}"
