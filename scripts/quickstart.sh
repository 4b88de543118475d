#!/usr/bin/env bash
# README command 1: set up (idempotent), pretrain SimCLR on the built-in digits, probe the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hssl pretrain recipes/quickstart.yaml --device cpu
run=$(ls -td checkpoints/quickstart/*/ | head -n 1)
.venv/bin/hssl probe "${run}last.safetensors" --device cpu
