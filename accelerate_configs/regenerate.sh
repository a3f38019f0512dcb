#!/usr/bin/env bash
# Regenerates every committed file in accelerate_configs/ and ds_configs/ from the example
# recipes. Usage: bash accelerate_configs/regenerate.sh [OUT_DIR]   (default: the repo root)
# A test runs this into a temporary directory and fails on any difference.
set -euo pipefail
out="${1:-.}"
for s in ddp zero2 zero3 zero3_offload fsdp; do
  launcher configs examples/llama3-8b-8gpu.yaml "dist.strategy=$s" --device gpu --out "$out" >/dev/null
done
launcher configs examples/llama3-8b-8gpu.yaml dist.strategy=fsdp dist.fsdp_version=1 --name fsdp1 --device gpu --out "$out" >/dev/null
launcher configs examples/llama2-70b-2gpu-fsdp-offload.yaml --device gpu --out "$out" >/dev/null
