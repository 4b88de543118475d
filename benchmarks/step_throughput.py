"""Images/s of one SimCLR training step (augment + forward + backward + optimiser) and the share of the
step spent in augmentation, for the small ConvNet and ResNet-18 (CIFAR stem) at 32x32.

    .venv/bin/python benchmarks/step_throughput.py --device cpu --batch-size 256 --steps 5

Random uint8 images stand in for data (the step's cost does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from hssl_cli.data.views import build_pipelines, draw_views
from hssl_cli.engine.optim import build_optimizer
from hssl_cli.methods import build_method
from hssl_cli.recipe import parse_recipe


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(backbone: str, device: torch.device, batch_size: int, steps: int) -> dict[str, float]:
    recipe = parse_recipe(f"model: {{backbone: {backbone}}}\noptim: {{name: lars}}\n", "benchmark")
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    mean, std = torch.full((3,), 0.5, device=device), torch.full((3,), 0.25, device=device)
    pipelines = build_pipelines(recipe, mean, std)
    method = build_method(recipe, in_channels=3).to(device)
    optimizer = build_optimizer(method, recipe.optim)
    bf16 = device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(0)
    augment_seconds = step_seconds = 0.0
    for step in range(steps + 1):  # step 0 warms up
        synchronize(device)
        start = time.perf_counter()
        views = draw_views(pipelines, images, generator, False, mean, std)
        synchronize(device)
        augmented = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = method(views, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if step > 0:
            augment_seconds += augmented - start
            step_seconds += time.perf_counter() - start
    return {"images_per_second": steps * batch_size / step_seconds, "augment_share": augment_seconds / step_seconds,
            "step_seconds": step_seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    table = Table(title=f"SimCLR step, batch {args.batch_size} (2 views of 3x32x32), {device.type}, "
                  f"{torch.get_num_threads()} threads")
    for column in ("backbone", "images/s", "s/step", "augmentation share"):
        table.add_column(column)
    for backbone in ("small_convnet", "resnet18_cifar"):
        result = measure(backbone, device, args.batch_size, args.steps)
        table.add_row(backbone, f"{result['images_per_second']:.0f}", f"{result['step_seconds']:.3f}",
                      f"{100 * result['augment_share']:.1f} %")
    Console().print(table)


if __name__ == "__main__":
    main()
