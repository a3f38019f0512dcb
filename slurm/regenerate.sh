#!/usr/bin/env bash
# Regenerates slurm/qlora.sbatch: the plain sbatch script that `launcher submit` writes beside
# every run (RUN/slurm/plain.sbatch), here for slurm/example-cluster.yaml, with the paths made
# relative to the submission directory. Usage: bash slurm/regenerate.sh [OUT_DIR]
# A test runs this into a temporary directory and fails on any difference.
set -euo pipefail
out="$(realpath "${1:-slurm}")"
root="$(pwd)"
tmp="$(realpath "$(mktemp -d)")"
trap 'rm -rf "$tmp"' EXIT
py="$(python -c 'import sys; print(sys.executable)')"
(cd "$tmp" && python -m launcher submit "$root/slurm/example-cluster.yaml" --dry-run >/dev/null)
sed -e "s|$tmp/||g" -e "s|$py -m|python -m|g" "$tmp/runs/llama3-8b-2x8/slurm/plain.sbatch" > "$out/qlora.sbatch"
