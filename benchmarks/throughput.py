"""SimCLR training throughput, in ONE run, on the CIFAR-10 JPEG copy:

  (a) hssl's training step: uint8 data on the device, batched augmentation on the device, bf16 autocast
      and channels_last on CUDA (hssl_cli.engine.train.training_step, the engine's own step);
  (b) a reference pipeline of the usual kind: torchvision per-image transforms on PIL images in a
      DataLoader with workers, the same model and loss, fp32 eager;
  (c) the ceiling: forward + backward + update alone on pre-made views (same precision as (a));
  (a') (a) fed by the streamed reader (data.storage: stream, --workers DataLoader workers decoding ahead);
  (d) the streamed reader alone: images/s it reads and decodes (the decode rate).

    .venv/bin/python benchmarks/throughput.py --data /tmp/cifar10-jpeg --batch-size 512 --steps 20
    .venv/bin/python benchmarks/throughput.py --tarball ../shared/datasets/cifar10-jpeg.tar.gz

Prints images/s of each, a/b and a/c, peak memory and, on a GPU, the fraction of the device's bf16
peak (ResNet-18-CIFAR: ~3.3 GFLOPs forward+backward per 32x32 view, two views per image). The pipelines fed by
DataLoader workers (b, a', d) run at least ten times the batches their workers decode ahead (on CUDA; d
always), so a full prefetch queue cannot pass for throughput.
"""

from __future__ import annotations

import argparse
import os
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hssl_cli.data.augment import ViewParams
from hssl_cli.data.sources import load_split
from hssl_cli.data.statistics import channel_stats
from hssl_cli.data.stream import PREFETCH_BATCHES
from hssl_cli.data.views import Views, build_pipelines
from hssl_cli.engine.optim import build_optimizer
from hssl_cli.engine.train import training_step
from hssl_cli.losses import info_nce
from hssl_cli.methods import build_method
from hssl_cli.recipe import parse_recipe
from hssl_cli.render import progress_bars

GFLOPS_PER_VIEW = 3.3  # ResNet-18-CIFAR forward+backward at 32x32
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, SXM figures


def recipe_for(args: argparse.Namespace):
    return parse_recipe(
        f"data: {{dataset: imagefolder, root: '{args.data}', image_size: 32}}\n"
        f"model: {{backbone: {args.backbone}}}\n"
        "optim: {name: lars, lr: 4.0, weight_decay: 1.0e-6}\n"
        f"train: {{batch_size: {args.batch_size}, compile: {str(args.compile).lower()}}}\n", "benchmark")


def timed(run_step, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s over `steps` steps after `warmup` untimed ones (returns seconds per step)."""
    for _ in range(warmup):
        run_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hssl_step(args, recipe, device) -> float:
    train = load_split(recipe.data, "train", progress=progress_bars(True))
    images = train.images.to(device)
    mean, std = channel_stats(train.images)
    mean, std = mean.float().to(device), std.float().to(device)
    bf16 = device.type == "cuda"
    pipelines = build_pipelines(recipe, mean, std, device.type, bf16)  # bf16 channels_last views on CUDA
    if args.compile:
        for pipeline in pipelines:
            pipeline.augmenter.compile()
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=3).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, recipe.optim)
    forward = torch.compile(method) if args.compile else method
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        batch = images[torch.randint(len(images), (args.batch_size,), device=device, generator=generator)]
        training_step(forward, optimizer, pipelines, recipe.method.consumes.original, mean, std, batch, generator,
                      recipe.optim.lr, bf16)

    return timed(step, args.steps, args.warmup, device)


def streamed_images(args, recipe, device):
    """The training split with data.storage stream (DataLoader workers read and decode the batches)."""
    from hssl_cli.data.stream import training_images

    config = recipe.data.model_copy(update={"storage": "stream", "workers": args.workers})
    images, _ = training_images(config, 0, device)
    permutation = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images, permutation


def steady_steps(args, device: torch.device, batches_in_epoch: int, always: bool = False) -> int:
    """Timed steps of a pipeline fed by DataLoader workers: at least ten times the batches they hold decoded
    ahead (PREFETCH_BATCHES per worker, hssl's and torch's default), so the rate is the steady state's, not
    the prefetch queue's. Only on CUDA unless `always`: on a CPU the model is far slower than the workers, the
    queue never drains, and `--steps` already measures the steady state."""
    if not (always or device.type == "cuda"):
        return args.steps
    return min(max(args.steps, 10 * PREFETCH_BATCHES * max(1, args.workers)), batches_in_epoch - args.warmup)


def stream_reader(args, recipe, device) -> float:
    """d: the streamed reader alone: read + decode + resize of one batch, no training."""
    images, permutation = streamed_images(args, recipe, device)
    batches = images.epoch_batches(permutation, 0, args.batch_size, args.batch_size, 0)
    steps = steady_steps(args, device, len(permutation) // args.batch_size, always=True)
    return timed(lambda: next(batches), steps, args.warmup, device)


def streamed_step(args, recipe, device) -> float:
    """a': hssl's step fed by the streamed reader instead of the decoded split on the device."""
    images, permutation = streamed_images(args, recipe, device)
    batches = images.epoch_batches(permutation, 0, args.batch_size, args.batch_size, 0)
    mean, std = torch.full((3,), 0.5, device=device), torch.full((3,), 0.25, device=device)
    bf16 = device.type == "cuda"
    pipelines = build_pipelines(recipe, mean, std, device.type, bf16)
    if args.compile:
        for pipeline in pipelines:
            pipeline.augmenter.compile()
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=3).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, recipe.optim)
    forward = torch.compile(method) if args.compile else method  # (a) exactly, but for where the batches come from
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        training_step(forward, optimizer, pipelines, recipe.method.consumes.original, mean, std, next(batches),
                      generator, recipe.optim.lr, bf16)

    return timed(step, steady_steps(args, device, len(permutation) // args.batch_size), args.warmup, device)


def reference_step(args, recipe, device) -> float:
    from torchvision import datasets
    from torchvision.transforms import v2

    config = recipe.augment
    jitter = config.color_jitter
    one_view = v2.Compose([
        v2.RandomResizedCrop(32, scale=config.crop_scale, ratio=config.crop_ratio),
        v2.RandomHorizontalFlip(config.flip),
        v2.RandomApply([v2.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)], jitter.p),
        v2.RandomGrayscale(config.grayscale),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26]),
    ])
    dataset = datasets.ImageFolder(str(Path(args.data) / "train"), transform=lambda image: (one_view(image),
                                                                                             one_view(image)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=3).to(device)
    optimizer = build_optimizer(method, recipe.optim)
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        try:
            (view1, view2), _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            (view1, view2), _ = next(batches)
        z1, z2 = method.projector(method.backbone(torch.cat([view1.to(device), view2.to(device)]))).chunk(2)
        loss = info_nce(z1, z2, 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, steady_steps(args, device, 10**9), args.warmup, device)  # the loader restarts at an epoch's end


def ceiling_step(args, recipe, device) -> float:
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=3).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if device.type == "cuda":
        method = method.to(memory_format=memory_format)
    optimizer = build_optimizer(method, recipe.optim)
    forward = torch.compile(method) if args.compile else method
    views = Views(
        global_views=[torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
                      for _ in range(2)],
        global_params=[ViewParams.identity(args.batch_size, device) for _ in range(2)])
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward(views, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, args.steps, args.warmup, device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        value = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)"
        torch.cuda.reset_peak_memory_stats()
        return value
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS so far)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="cifar10-jpeg folder with train/<class>/*.jpg")
    parser.add_argument("--tarball", help="cifar10-jpeg.tar.gz to unpack into a temp folder instead of --data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the reference pipeline and of the streamed reader (default: 8, "
                        "or the CPU count if fewer)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model in (a) and (c), the augmentation in (a)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by name)")
    args = parser.parse_args()
    if args.data is None:
        if args.tarball is None:
            parser.error("give --data or --tarball")
        unpacked = tempfile.mkdtemp(prefix="hssl-cifar10-")
        with tarfile.open(args.tarball) as archive:
            archive.extractall(unpacked, filter="data")
        args.data = str(Path(unpacked) / "cifar10-jpeg")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as `hssl pretrain` sets it, for every pipeline
    recipe = recipe_for(args)

    console = Console(width=160)  # whole rows in a log file too
    results = {}
    for name, run in (("a: hssl step", hssl_step), ("b: reference DataLoader pipeline", reference_step),
                      ("c: forward+backward ceiling", ceiling_step), ("a': hssl step, streamed", streamed_step),
                      ("d: streamed reader alone (read + decode)", stream_reader)):
        console.print(f"measuring {name} ...")
        seconds = run(args, recipe, device)
        results[name] = (args.batch_size / seconds, peak_memory(device))

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((value for key, value in BF16_PEAK_TFLOPS.items() if key in name), None)
    title = (f"SimCLR {args.backbone}, batch {args.batch_size}, {args.steps} timed steps, {device.type}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                f" ({torch.get_num_threads()} threads)"))
    table = Table(title=title)
    for column in ("pipeline", "images/s", "peak memory", "fraction of bf16 peak"):
        table.add_column(column)
    for name, (images_per_second, memory) in results.items():
        fraction = "" if peak is None else f"{images_per_second * 2 * GFLOPS_PER_VIEW / (peak * 1e3):.1%}"
        table.add_row(name, f"{images_per_second:,.0f}", memory, fraction)
    console.print(table)
    a, b, c, streamed = (value[0] for value in list(results.values())[:4])
    console.print(f"a/b = {a / b:.2f}   a/c = {a / c:.2f}   a'/a = {streamed / a:.2f} (streamed over in-memory)")


if __name__ == "__main__":
    main()
