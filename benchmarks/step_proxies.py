"""CPU-measurable proxies of the GPU hot path (issue 15), before and after, in one run:

  ops/step      aten ops dispatched by one training step, counted by torch.profiler (top-level ops only, so
                an op that calls others counts once; on CUDA the kernels launched are counted too);
  host ms/step  wall time of one step with the backbone replaced by a tiny one (global pool + a linear
                layer): what is left is the engine's own work (augmentation, heads, loss, optimiser);
  aug us/image  the augmentation of one view per image, alone.

"before" and "after" are the reference and the fast path of the same code: the augmenter with every op
(`Augmenter.reference()`: colour jitter in four rounds that each compute the hue shift for every sample)
against the one that leaves out the ops its config never draws and computes each sample's hue once; BYOL's target
buffers copied in a Python loop against one `torch._foreach_copy_`; DirectPred's predictor recomputed
every step against every 10 (`method.predictor_every`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_proxies.py --batch-size 512 --steps 5
    .venv/bin/python benchmarks/step_proxies.py --device cuda --compiled      # adds the compiled step
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from throughput import synchronize, timed  # benchmarks/: the same timing as the throughput report
from torch import nn

from hssl_cli.data.views import build_pipelines
from hssl_cli.engine.optim import build_optimizer
from hssl_cli.engine.train import training_step
from hssl_cli.methods import build_method
from hssl_cli.methods import byol as byol_module
from hssl_cli.recipe import parse_recipe

# SimCLR's CIFAR augmentation as the CIFAR recipes set it: no blur, no solarize
CIFAR_AUGMENT = ("augment: {crop_scale: [0.2, 1.0], flip: 0.5, grayscale: 0.2, blur: {p: 0.0}, solarize: 0.0,\n"
                 "          color_jitter: {p: 0.8, brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1}}\n")


class TinyBackbone(nn.Module):
    """Global average pool + one linear layer: a model whose cost is negligible beside the engine's."""

    def __init__(self, channels: int, feature_dim: int = 64):
        super().__init__()
        self.linear = nn.Linear(channels, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.mean(dim=(2, 3)))


def count_ops(function: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(top-level aten ops, device kernels) of one call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        function()
        synchronize(device)
    ops = kernels = 0
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
        elif event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            ops += parent is None
    return ops, kernels


def loop_copy_update(target: nn.ModuleDict, backbone: nn.Module, projector: nn.Module, tau: float) -> None:
    """BYOL's target update as it was: the parameters by one foreach lerp, the buffers copied one by one."""
    with torch.no_grad():
        online = [*backbone.parameters(), *projector.parameters()]
        torch._foreach_lerp_(list(target.parameters()), online, 1 - tau)
        for target_buffer, online_buffer in zip(target.buffers(), [*backbone.buffers(), *projector.buffers()],
                                                strict=True):
            target_buffer.copy_(online_buffer)


def step_case(method_yaml: str, device: torch.device, batch_size: int, reference_augment: bool,
              compiled: bool = False) -> Callable[[], object]:
    recipe = parse_recipe(f"data: {{dataset: digits, image_size: 32}}\n{CIFAR_AUGMENT}"
                          f"model: {{backbone: small_convnet, projector: [64, 32]}}\nmethod: {method_yaml}\n"
                          "optim: {name: lars, lr: 0.3}\n", "proxies.yaml")
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=3)
    method.backbone = TinyBackbone(3)
    for name in ("target",):  # BYOL / DirectPred: the target's copy of the backbone too
        if getattr(method, name, None) is not None:
            method.target["backbone"] = TinyBackbone(3).requires_grad_(False)
    if hasattr(method, "projector"):
        method.projector[0] = nn.Linear(64, method.projector[0].out_features, bias=False)
        if getattr(method, "target", None) is not None:
            method.target["projector"][0] = nn.Linear(64, method.projector[0].out_features,
                                                      bias=False).requires_grad_(False)
    method = method.to(device).train()
    mean, std = torch.full((3,), 0.5, device=device), torch.full((3,), 0.25, device=device)
    pipelines = build_pipelines(recipe, mean, std)
    if reference_augment:
        for pipeline in pipelines:
            pipeline.augmenter.reference()
    if compiled:
        for pipeline in pipelines:
            pipeline.augmenter.compile()
    optimizer = build_optimizer(method, recipe.optim)
    forward = torch.compile(method) if compiled else method
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    progress = [0.0]

    def step() -> None:
        training_step(forward, optimizer, pipelines, recipe.method.consumes.original, mean, std, images, generator,
                      0.3, device.type == "cuda")
        progress[0] += 1e-3
        method.after_optimizer_step(progress[0])

    return step


def augmentation_case(device: torch.device, batch_size: int, reference: bool,
                      compiled: bool = False) -> Callable[[], object]:
    recipe = parse_recipe(f"data: {{dataset: digits, image_size: 32}}\n{CIFAR_AUGMENT}", "proxies.yaml")
    mean, std = torch.full((3,), 0.5, device=device), torch.full((3,), 0.25, device=device)
    augmenter = build_pipelines(recipe, mean, std)[0].augmenter
    if reference:
        augmenter.reference()
    if compiled:
        augmenter.compile()
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    return lambda: augmenter(images, generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also the compiled augmentation and SimCLR "
                        "step (slow to build on a CPU)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    device, batch = torch.device(args.device), args.batch_size
    rows = []

    def measure(name: str, variant: str, function: Callable[[], object], per_image: bool = False) -> None:
        seconds = timed(function, args.steps, 1, device)  # one warm-up call (and compilation)
        ops, kernels = count_ops(function, device)
        rows.append({"case": name, "variant": variant, "ops_per_call": ops, "kernels_per_call": kernels,
                     "host_ms": 1e3 * seconds, "us_per_image": 1e6 * seconds / batch if per_image else None})

    for variant, reference in (("before: every op", True), ("after: active ops only", False)):
        measure("augmentation (1 view)", variant, augmentation_case(device, batch, reference), per_image=True)
    for variant, reference in (("before: every op", True), ("after: active ops only", False)):
        measure("SimCLR step, tiny model", variant, step_case("{name: simclr}", device, batch, reference))
    original_update = byol_module.update_target
    byol_module.update_target = loop_copy_update
    try:
        measure("BYOL step, tiny model", "before: buffers copied in a loop",
                step_case("{name: byol, predictor: [64, 32]}", device, batch, False))
    finally:
        byol_module.update_target = original_update
    measure("BYOL step, tiny model", "after: one _foreach_copy_",
            step_case("{name: byol, predictor: [64, 32]}", device, batch, False))
    ema_method = build_method(parse_recipe("model: {backbone: resnet18_cifar, projector: [64, 32]}\n"
                                           "method: {name: byol, predictor: [64, 32]}\n", "proxies.yaml"), 3).to(device)
    for variant, update in (("before: buffers copied in a loop", loop_copy_update),
                            ("after: one _foreach_copy_", original_update)):
        measure("BYOL target update alone, ResNet-18-CIFAR", variant,
                lambda update=update: update(ema_method.target, ema_method.backbone, ema_method.projector, 0.99))
    for every in (1, 10):
        measure("DirectPred step, tiny model", f"predictor_every {every}",
                step_case(f"{{name: directpred, predictor_every: {every}}}", device, batch, False))
    if args.compiled:
        for variant, reference in (("before: every op, compiled", True), ("after: active ops only, compiled", False)):
            measure("augmentation (1 view)", variant, augmentation_case(device, batch, reference, True),
                    per_image=True)
        measure("SimCLR step, tiny model", "after, compiled", step_case("{name: simclr}", device, batch, False, True))

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Engine proxies on {device.type} ({torch.get_num_threads()} threads), batch {batch}, "
                  f"mean of {args.steps} calls after one warm-up")
    for column in ("case", "variant", "ops/call", "kernels/call", "host ms/call", "us/image"):
        table.add_column(column, justify="left" if column in ("case", "variant") else "right")
    for row in rows:
        table.add_row(row["case"], row["variant"], str(row["ops_per_call"]),
                      str(row["kernels_per_call"]) if device.type == "cuda" else "-", f"{row['host_ms']:.1f}",
                      f"{row['us_per_image']:.1f}" if row["us_per_image"] is not None else "-")
    Console(width=200).print(table)  # whole rows in a log file too


if __name__ == "__main__":
    main()
