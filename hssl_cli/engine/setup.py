"""A run's set-up, everything before its first step: the resume state, the training images and their
statistics, the method (seeded, checked against the data), the run folder (`set_up_run`); for SGD runs
the view pipelines, DDP and torch.compile wrapping, the optimiser (restored on resume), the schedule and
the fixed batch the diagnostics measure (`set_up_sgd`). Each user error is found here, before a step runs
and, where it can be, before a run folder exists."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from hssl_cli.data.augment import normalize
from hssl_cli.data.stream import InMemoryImages, StreamedImages, training_images
from hssl_cli.data.views import ViewPipeline, build_pipelines
from hssl_cli.engine import checkpoint as ckpt
from hssl_cli.engine import distributed
from hssl_cli.engine.device import seeded_generator, uses_bf16, uses_compile
from hssl_cli.engine.initial_weights import load_initial_weights
from hssl_cli.engine.optim import build_optimizer
from hssl_cli.engine.run_writer import RunWriter, unwritable
from hssl_cli.errors import CheckpointError, CheckpointNote, HsslError
from hssl_cli.methods import METHODS, build_method
from hssl_cli.methods.base import SSLMethod
from hssl_cli.recipe import Recipe, changed_keys, describe_changes, resume_safe
from hssl_cli.render import progress_bars

HELD_BATCH = 512  # images of the fixed batch that training-time diagnostics are measured on


@dataclass
class RunSetup:
    """What every run needs, checked: the data, the method and the folder its files go to."""

    recipe: Recipe
    context: distributed.Distributed
    device: torch.device
    images: InMemoryImages | StreamedImages
    mean: torch.Tensor  # per-channel statistics of the training images, on the device
    std: torch.Tensor
    method: SSLMethod
    writer: RunWriter
    state: ckpt.Checkpoint | None  # the training state a resumed run continues from; None for a new run


@dataclass
class SgdSetup:
    """What the SGD loop needs besides the run: the step's pieces and the schedule."""

    model: nn.Module  # the method, DDP-wrapped under torchrun/srun
    forward: nn.Module  # the model, compiled when train.compile says so
    optimizer: torch.optim.Optimizer
    pipelines: list[ViewPipeline]
    with_original: bool  # the method also reads the un-augmented image
    bf16: bool
    start_step: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    held_images: torch.Tensor  # normalised, for the diagnostics


def set_up_run(recipe: Recipe, output_root: Path, device: torch.device, context: distributed.Distributed,
               resume: str | None, init_from: Path | None, progress: Callable[[dict], None] | None) -> RunSetup:
    """Load and check everything a run needs; the run folder exists only once the recipe, the data and the
    model are known to be good. The caller closes the result's writer."""
    check_run_options(recipe, context, resume, init_from)
    state = resume_state(recipe, output_root, resume)
    images, storage = training_images(recipe.data, recipe.seed, device, progress=progress_bars(context.is_main))
    if METHODS[recipe.method.name].closed_form and images.storage == "stream":
        raise HsslError(f"method {recipe.method.name} solves in closed form on all training images at once; it "
                        "needs data.storage: memory")
    if progress is not None and context.is_main and storage is not None:
        progress({"step": 0, "message": storage})
    mean, std = images.channel_stats(progress=progress_bars(context.is_main))
    torch.manual_seed(recipe.seed)  # the initial weights
    method = build_method(recipe, in_channels=images.sample_shape[0]).to(device)
    check_backbone_reads(method.backbone, images.sample_shape, device, recipe)
    initial_weights = None
    if init_from is not None and state is None:
        initial_weights = load_initial_weights(method, init_from, recipe.model.backbone)
    if not method.closed_form and len(images) < recipe.train.batch_size:
        raise HsslError(f"train.batch_size={recipe.train.batch_size} exceeds the {len(images)} images of "
                        f"{recipe.data.dataset}/{recipe.data.train_split}; lower it")
    if state is not None:
        run_dir = state.path.parent
    else:
        run_dir = Path(context.broadcast(str(new_run_dir(output_root, recipe)) if context.is_main else None))
    writer = RunWriter(run_dir, recipe, {"mean": mean.float(), "std": std.float()}, context.is_main,
                       resumed_step=state.step if state is not None else 0)
    if state is None and storage is not None:
        writer.log({"step": 0, "data_storage": images.storage, "data_storage_reason": storage})
    if initial_weights is not None:
        writer.log(initial_weights.log_row())
    return RunSetup(recipe, context, device, images, mean.to(device), std.to(device), method, writer, state)


def set_up_sgd(run: RunSetup) -> SgdSetup:
    """The view pipelines, the wrapped and compiled model, the optimiser (with its state on resume), the
    schedule's lengths and the diagnostics' fixed batch."""
    recipe, device, method, state = run.recipe, run.device, run.method, run.state
    steps_per_epoch = len(run.images) // recipe.train.batch_size
    bf16, compile_step = uses_bf16(recipe.train, device), uses_compile(recipe.train, device)
    pipelines = build_pipelines(recipe, run.mean, run.std, device.type, bf16)
    if compile_step:
        for pipeline in pipelines:
            pipeline.augmenter.compile()
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution kernels once
    model = distributed.wrap(method, run.context, device, recipe.model.sync_bn)
    optimizer = build_optimizer(method, recipe.optim, fused=device.type == "cuda" and recipe.optim.name != "lars")
    start_step = 0
    if state is not None:
        ckpt.load_module_state(method, state.prefixed("model"), state.path, "model")
        ckpt.restore_optimizer(optimizer, state)
        start_step = state.step
    forward = torch.compile(model) if compile_step else model
    total_steps = steps_per_epoch * recipe.train.epochs
    if state is not None and (start_step > total_steps or state.epoch != start_step // steps_per_epoch):
        raise CheckpointError(f"{state.path}: its metadata says step {start_step} of epoch {state.epoch}, which "
                              f"does not fit this run ({steps_per_epoch} steps per epoch, {total_steps} in all); "
                              "the file is corrupt: start a new run")
    held_order = torch.randperm(len(run.images), generator=seeded_generator(device, recipe.seed, 0), device=device)
    held_images = normalize(run.images.gather(held_order[:HELD_BATCH]), run.mean, run.std)
    return SgdSetup(model, forward, optimizer, pipelines, recipe.method.consumes.original, bf16, start_step,
                    steps_per_epoch, total_steps, round(recipe.optim.warmup_epochs * steps_per_epoch), held_images)


def check_run_options(recipe: Recipe, context: distributed.Distributed, resume: str | None,
                      init_from: Path | None) -> None:
    batch_size = recipe.train.batch_size
    if batch_size % context.world_size:
        raise HsslError(f"train.batch_size={batch_size} (the global batch) must divide evenly over "
                        f"{context.world_size} processes")
    if resume is not None and init_from is not None:
        raise HsslError("--resume continues a run, --init-from starts a new one from a checkpoint's or a "
                        "backbone's weights; give one of them")


def resume_state(recipe: Recipe, output_root: Path, resume: str | None) -> ckpt.Checkpoint | None:
    """The state `--resume` names (None without --resume, or when `auto` finds none), refused when the
    recipe changed a key that resuming cannot honour."""
    state = find_resume_state(resume, output_root, recipe) if resume is not None else None
    if state is None:
        return None
    altered = [key for key in changed_keys(state.recipe, recipe) if not resume_safe(key)]
    if altered:
        raise HsslError(f"--resume {state.path}: the recipe differs from the run's in "
                        f"{describe_changes(state.recipe, recipe, altered)}; restore those keys, or start a new run "
                        f"from the run's weights with --init-from {state.path.parent / 'last.safetensors'}")
    return state


def find_resume_state(resume: str, output_root: Path, recipe: Recipe) -> ckpt.Checkpoint | None:
    """The training state to resume, loaded once. `auto`: the newest run folder of this recipe with a
    readable state (None when there is none yet: a requeued job's first start); else the state beside the
    given path."""
    if resume != "auto":
        return ckpt.load_checkpoint(state_path(Path(resume)), kind="training_state")
    runs = sorted((output_root / recipe.name).glob("*/last.state.safetensors"), reverse=True)
    for candidate in runs:
        try:
            return ckpt.load_checkpoint(candidate, kind="training_state")
        except HsslError as error:  # e.g. cut short by a kill: an older run may still resume
            warnings.warn(CheckpointNote(f"--resume auto skipped {candidate}: {error}"), stacklevel=2)
    return None


def state_path(path: Path) -> Path:
    """The last.state.safetensors that `--resume PATH` means (a run folder, or a file in it)."""
    if path.is_dir():
        return path / "last.state.safetensors"
    if path.name.endswith(".state.safetensors"):
        return path
    if path.is_file() and path.name != "last.safetensors":
        raise HsslError(f"--resume {path}: only a run's last state can be resumed (its folder, last.safetensors "
                        f"or last.state.safetensors); to start a new run from these weights use --init-from {path}")
    return path.with_name("last.state.safetensors")


def new_run_dir(output_root: Path, recipe: Recipe) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = output_root / recipe.name / stamp
    suffix = 1
    while run_dir.exists():
        run_dir = output_root / recipe.name / f"{stamp}-{suffix}"
        suffix += 1
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        raise unwritable(output_root, error) from None
    return run_dir


def check_backbone_reads(backbone: nn.Module, sample_shape: tuple[int, ...], device: torch.device,
                         recipe: Recipe) -> None:
    """One eval-mode forward of two blank images: a backbone that cannot read this data's size (a timm ViT
    built for 224 px on 32 px images) fails here, in one line, before a run folder exists."""
    blank = torch.zeros(2, *sample_shape, device=device)
    training = backbone.training
    try:
        with torch.no_grad():
            backbone.eval()(blank)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise HsslError(f"model.backbone {recipe.model.backbone} cannot read {sample_shape[0]}-channel "
                        f"{sample_shape[-1]}x{sample_shape[-1]} images ({' '.join(str(error).split())[:200]}); "
                        "set data.image_size to a size it takes, or choose another backbone") from None
    finally:
        backbone.train(training)
