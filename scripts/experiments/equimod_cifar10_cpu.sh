#!/usr/bin/env bash
# SimCLR vs SimCLR+EquiMod and BYOL vs BYOL+EquiMod at one CPU budget on the CIFAR-10 JPEG copy:
# small ConvNet, 5,000 training images, 6 epochs, batch 256; probes use the full train/test splits.
#   bash scripts/experiments/equimod_cifar10_cpu.sh /tmp/cifar10-jpeg /tmp/equimod-runs
set -euo pipefail
data=${1:?usage: equimod_cifar10_cpu.sh CIFAR10_JPEG_DIR OUTPUT_DIR}
out=${2:?usage: equimod_cifar10_cpu.sh CIFAR10_JPEG_DIR OUTPUT_DIR}
budget=(--set "data.root=$data" --set data.subset=5000 --set train.epochs=6 --device cpu --output "$out")
for recipe in simclr_equimod_cpu byol_equimod_cpu; do
    for variant in baseline equimod; do
        name="${recipe%_equimod_cpu}_$variant"
        extra=(--set "name=$name")
        [ "$variant" = baseline ] && extra+=(--set method.equimod=null)
        .venv/bin/hssl pretrain "recipes/$recipe.yaml" "${budget[@]}" "${extra[@]}"
        run=$(ls -td "$out/$name"/*/ | head -n 1)
        .venv/bin/hssl probe "${run}last.safetensors" --device cpu --json > "$out/$name.probe.json"
    done
done
