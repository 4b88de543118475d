#!/usr/bin/env bash
# The GPU hot path, measured in one run (issue 15): at most about 8 minutes on an H100/H200, needing only
# this repository and the CIFAR-10 JPEG tarball (and, where escnn is not installed, its wheels).
#
#   bash benchmarks/gpu_check.sh --tarball ../shared/datasets/cifar10-jpeg.tar.gz
#   bash benchmarks/gpu_check.sh --device cpu --steps 2 --tarball ../shared/datasets/cifar10-jpeg.tar.gz  # dry run
#
# Prints, in order:
#   1. engine proxies: ops (and kernels) per step, host ms per step with a tiny model, augmentation us/image,
#      before/after (benchmarks/step_proxies.py);
#   2. images/s and peak memory of (a) the hssl step, (b) the torchvision-DataLoader reference pipeline,
#      (c) the forward+backward ceiling, a/b, a/c and the fraction of bf16 peak: eager, then compiled
#      (benchmarks/throughput.py, SimCLR ResNet-18-CIFAR, batch 512);
#   3. the H-SSL vs A-SSL step pair on the C8 escnn backbone (benchmarks/hssl_throughput.py);
#   4. a 2-epoch SimCLR run on the CIFAR-10 JPEG copy (its wall time) and `hssl probe` of its checkpoint.
# Options: --device cuda|cpu (default: cuda when present), --steps N (timed steps per measurement, default
# 20), --tarball PATH (default ../shared/datasets/cifar10-jpeg.tar.gz), --wheels DIR (pip-installs escnn
# and its needs from DIR into a temporary folder when escnn is missing).
# On the CPU (a dry run of the plumbing) the sizes shrink: batch 32, the small ConvNet for step 4, a 2,048-
# image subset and a 1,000 / 1,000-image probe; its numbers say nothing about a GPU.
set -euo pipefail

device="" steps=20 tarball="../shared/datasets/cifar10-jpeg.tar.gz" wheels=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --tarball) tarball="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
[[ -f "$tarball" ]] || { echo "gpu_check.sh: no tarball at $tarball (--tarball PATH)" >&2; exit 2; }
if [[ -z "$device" ]]; then
  device=$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
work=$(mktemp -d /tmp/hssl-gpu-check-XXXXXX)
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c 'import escnn' 2>/dev/null; then
  if [[ -n "$wheels" ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:$work/site"
  fi
fi
hssl=("$python" -m hssl_cli)
started=$(date +%s)
section() { echo; echo "=== $1 ($(( $(date +%s) - started )) s) ==="; }

section "environment"
"$python" - "$device" <<'EOF'
import sys, torch
device = sys.argv[1]
name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
print(f"torch {torch.__version__}, device {device}: {name}")
EOF
tar xzf "$tarball" -C "$work"
data="$work/cifar10-jpeg"
if [[ "$device" == cuda ]]; then batch=512; probe_args=(); run_sets=(); else
  batch=32; probe_args=(--train-subset 1000 --test-subset 1000)
  run_sets=(--set model.backbone=small_convnet --set data.subset=2048 --set train.batch_size=256 --set train.compile=false)
fi

section "1. engine proxies (ops per step, host time with a tiny model, augmentation)"
"$python" benchmarks/step_proxies.py --device "$device" --batch-size 512 --steps "$steps" --compiled

section "2a. throughput, eager: (a) hssl step, (b) DataLoader reference, (c) ceiling"
"$python" benchmarks/throughput.py --data "$data" --device "$device" --batch-size "$batch" --steps "$steps" --warmup 2
section "2b. throughput, compiled"
"$python" benchmarks/throughput.py --data "$data" --device "$device" --batch-size "$batch" --steps "$steps" --warmup 2 \
  --compile

section "3. H-SSL vs A-SSL step (C8 escnn backbone)"
if "$python" -c 'import escnn' 2>/dev/null; then
  "$python" benchmarks/hssl_throughput.py --device "$device" --steps "$steps" --warmup 2 \
    $( [[ "$device" == cpu ]] && echo --batch-size 16 )
else
  echo "escnn is not installed: skipped (carry its wheels and pass --wheels DIR)"
fi

section "4. a 2-epoch SimCLR run on the CIFAR-10 JPEG copy, then its probe"
run_start=$(date +%s)
"${hssl[@]}" pretrain recipes/simclr_cifar10.yaml --output "$work/runs" --device "$device" \
  --set data.dataset=imagefolder --set "data.root=$data" --set train.epochs=2 --set optim.warmup_epochs=1 \
  --set train.checkpoint_every=1 "${run_sets[@]}"
echo "2-epoch run: $(( $(date +%s) - run_start )) s wall (data loading and compilation included)"
checkpoint=$(ls -t "$work"/runs/simclr_cifar10/*/last.safetensors | head -1)
"${hssl[@]}" probe "$checkpoint" --device "$device" --data-root "$data" "${probe_args[@]}"
section "done"
