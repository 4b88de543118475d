"""Training-step throughput of H-SSL (|G| views from one forward pass) against its augmentation-SSL twin
(two forward passes of rotated inputs) on the same escnn backbone, head and loss.

    .venv/bin/python benchmarks/hssl_throughput.py --recipe recipes/hssl_rotmnist_c8.yaml --steps 10

The twin is the same recipe with method.pairing=inputs. Random uint8 images stand in for data.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from hssl_cli.data.views import build_pipelines
from hssl_cli.engine.optim import build_optimizer
from hssl_cli.engine.train import training_step
from hssl_cli.methods import build_method
from hssl_cli.recipe import load_recipe


def seconds_per_step(recipe, device: torch.device, steps: int, warmup: int) -> float:
    size = recipe.data.image_size
    images = torch.randint(0, 256, (recipe.train.batch_size, 1, size, size), dtype=torch.uint8, device=device)
    unit = torch.full((1,), 0.5, device=device)
    bf16 = device.type == "cuda"
    pipelines = build_pipelines(recipe, unit, unit, device.type, bf16)  # as the engine: bf16 channels_last on CUDA
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=1).to(device)
    optimizer = build_optimizer(method, recipe.optim)
    generator = torch.Generator(device=device).manual_seed(0)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        training_step(method, optimizer, pipelines, recipe.method.consumes.original, unit, unit, images, generator,
                      recipe.optim.lr, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/hssl_rotmnist_c8.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int)
    args = parser.parse_args()
    device = torch.device(args.device)
    overrides = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    table = Table(title=f"{args.recipe} on {device.type}, {args.steps} timed steps")
    for column in ("method", "images/s", "s/step"):
        table.add_column(column)
    for label, pairing in (("H-SSL (fibres of one pass)", "fibres"), ("augmentation SSL (two passes)", "inputs")):
        recipe = load_recipe(args.recipe, [*overrides, f"method.pairing={pairing}"])
        seconds = seconds_per_step(recipe, device, args.steps, args.warmup)
        table.add_row(label, f"{recipe.train.batch_size / seconds:,.0f}", f"{seconds:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
