"""The pretraining loop: data on the device, batched augmentation, one method forward, optimiser,
schedule, logging, checkpoints, signals and resume. It never names a method."""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from hssl_cli.data.augment import Augmenter, normalize
from hssl_cli.data.stream import InMemoryImages, StreamedImages, training_images
from hssl_cli.data.views import ViewPipeline, build_pipelines, draw_views
from hssl_cli.engine import checkpoint as ckpt
from hssl_cli.engine import distributed
from hssl_cli.engine.optim import build_optimizer, learning_rate
from hssl_cli.engine.run_writer import RunWriter, unwritable
from hssl_cli.errors import CheckpointError, CheckpointNote, HsslError, TrainingDiverged
from hssl_cli.methods import build_method
from hssl_cli.methods.base import SSLMethod
from hssl_cli.recipe import Recipe, changed_keys, describe_changes, resume_safe
from hssl_cli.render import progress_bars

HELD_BATCH = 512  # images of the fixed batch that training-time diagnostics are measured on


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    epochs: int
    steps: int
    final_loss: float
    wall_seconds: float
    images_per_second: float
    interrupted: bool
    is_main: bool = True  # False on the other ranks of a distributed run: they report nothing
    monitor: dict[str, float] = field(default_factory=dict)  # the online monitor's last values


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (pre-emption) or by a caller; the loop checkpoints and returns."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, *_: object) -> None:
        self.requested = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HsslError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    return torch.device(name)


def seeded_generator(device: torch.device, *parts: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch or step, ...): resuming needs no RNG state."""
    generator = torch.Generator(device=device)
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    generator.manual_seed(seed)
    return generator


def find_resume_state(resume: str, output_root: Path, recipe: Recipe) -> ckpt.Checkpoint | None:
    """The training state to resume, loaded once. `auto`: the newest run folder of this recipe with a
    readable state (None when there is none yet: a requeued job's first start); else the state beside the
    given path."""
    if resume != "auto":
        return ckpt.load_checkpoint(_state_path(Path(resume)), kind="training_state")
    runs = sorted((output_root / recipe.name).glob("*/last.state.safetensors"), reverse=True)
    for candidate in runs:
        try:
            return ckpt.load_checkpoint(candidate, kind="training_state")
        except HsslError as error:  # e.g. cut short by a kill: an older run may still resume
            warnings.warn(CheckpointNote(f"--resume auto skipped {candidate}: {error}"), stacklevel=2)
    return None


def _state_path(path: Path) -> Path:
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


def training_step(forward: nn.Module, optimizer: torch.optim.Optimizer, pipelines: list[ViewPipeline],
                  with_original: bool, mean: torch.Tensor, std: torch.Tensor, batch: torch.Tensor,
                  generator: torch.Generator, lr: float, bf16: bool) -> dict[str, torch.Tensor]:
    """One optimiser step on a uint8 batch: draw every view (one batched call per view spec), forward
    through `forward` (the method, or its DDP/compiled wrapper) with the step's generator, backward,
    update. No host synchronisation."""
    views = draw_views(pipelines, batch, generator, with_original, mean, std)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        losses = forward(views, generator)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return losses


def pretrain(
    recipe: Recipe,
    output_root: Path,
    device_name: str = "auto",
    resume: str | None = None,
    progress: Callable[[dict], None] | None = None,
    stop: StopRequest | None = None,
    diagnostics: Callable[[nn.Module, torch.Tensor], dict[str, float]] | None = None,
    init_from: Path | None = None,
    monitor: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
) -> RunResult:
    """Train `recipe` and write checkpoints; `progress` receives a dict per logged row; `diagnostics`
    (method, held normalised images) -> metrics runs every train.diagnostics_every epochs, in eval mode.
    `init_from`: a model checkpoint whose weights a new run starts from. `monitor` (method, mean, std) ->
    metrics runs every train.monitor.every epochs on rank 0, in eval mode; its rows go to the log and to
    `progress`, its last values into the result. Under torchrun/srun every rank
    runs this; rank 0 alone writes files and reports progress."""
    stop = stop or StopRequest()
    # from the start: a SIGTERM while the data loads ends the run cleanly too (before its first step)
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    context, device = distributed.setup(resolve_device(device_name))
    try:
        result = _pretrain(recipe, output_root, device, context, resume, init_from, progress, stop, diagnostics,
                           monitor)
        context.barrier()  # no rank exits before rank 0 has written the last checkpoint
        return result
    finally:
        distributed.teardown(context)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _resume_state(recipe: Recipe, output_root: Path, resume: str | None) -> ckpt.Checkpoint | None:
    state = find_resume_state(resume, output_root, recipe) if resume is not None else None
    if state is None:
        return None
    state_path = state.path
    altered = [key for key in changed_keys(state.recipe, recipe) if not resume_safe(key)]
    if altered:
        raise HsslError(f"--resume {state_path}: the recipe differs from the run's in "
                        f"{describe_changes(state.recipe, recipe, altered)}; restore those keys, or start a new run "
                        f"from the run's weights with --init-from {state_path.parent / 'last.safetensors'}")
    return state


def _backbone_runs_on(backbone: nn.Module, sample_shape: tuple[int, ...], device: torch.device,
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


def _initial_weights(method: nn.Module, init_from: Path) -> None:
    """A new run that starts from a checkpoint's weights (same architecture; optimiser and step start fresh)."""
    source = ckpt.load_checkpoint(init_from, kind="model")
    ckpt.load_module_state(method, {k: v for k, v in source.tensors.items() if not k.startswith("data.")},
                           source.path, "model (--init-from)")


def _pretrain(recipe: Recipe, output_root: Path, device: torch.device, context: distributed.Distributed,
              resume: str | None, init_from: Path | None, progress: Callable[[dict], None] | None,
              stop: StopRequest, diagnostics: Callable[[nn.Module, torch.Tensor], dict[str, float]] | None,
              monitor: Callable | None) -> RunResult:
    batch_size = recipe.train.batch_size
    if batch_size % context.world_size:
        raise HsslError(f"train.batch_size={batch_size} (the global batch) must divide evenly over "
                        f"{context.world_size} processes")
    if resume is not None and init_from is not None:
        raise HsslError("--resume continues a run, --init-from starts a new one from a checkpoint's weights; "
                        "give one of them")
    state = _resume_state(recipe, output_root, resume)

    images, storage = training_images(recipe.data, recipe.seed, device, progress=progress_bars(context.is_main))
    if recipe.method.name == "kernel" and images.storage == "stream":
        raise HsslError("method kernel solves in closed form on all training images at once; it needs "
                        "data.storage: memory")
    if progress is not None and context.is_main and storage is not None:
        progress({"step": 0, "message": storage})
    mean, std = images.channel_stats(progress=progress_bars(context.is_main))
    torch.manual_seed(recipe.seed)  # the initial weights
    method = build_method(recipe, in_channels=images.sample_shape[0]).to(device)
    _backbone_runs_on(method.backbone, images.sample_shape, device, recipe)
    if init_from is not None and state is None:
        _initial_weights(method, init_from)
    if not method.closed_form and len(images) < batch_size:
        raise HsslError(f"train.batch_size={batch_size} exceeds the {len(images)} images of "
                        f"{recipe.data.dataset}/{recipe.data.train_split}; lower it")
    # the run folder exists only once the recipe, the data and the model are known to be good
    if state is not None:
        run_dir = state.path.parent
    else:
        run_dir = Path(context.broadcast(str(new_run_dir(output_root, recipe)) if context.is_main else None))
    writer = RunWriter(run_dir, recipe, {"mean": mean.float(), "std": std.float()}, context.is_main,
                       resumed_step=state.step if state is not None else 0)
    if state is None and storage is not None:
        writer.log({"step": 0, "data_storage": images.storage, "data_storage_reason": storage})
    if init_from is not None and state is None:
        writer.log({"step": 0, "init_from": str(init_from)})
    try:
        return _train(recipe, writer, method, images, mean.to(device), std.to(device), device, context, state,
                      progress, stop, diagnostics, monitor)
    finally:
        writer.close()


def _train(recipe: Recipe, writer: RunWriter, method: SSLMethod, images: InMemoryImages | StreamedImages,
           mean: torch.Tensor,
           std: torch.Tensor, device: torch.device, context: distributed.Distributed, state: ckpt.Checkpoint | None,
           progress: Callable[[dict], None] | None, stop: StopRequest,
           diagnostics: Callable[[nn.Module, torch.Tensor], dict[str, float]] | None,
           monitor: Callable | None = None) -> RunResult:
    if method.closed_form:
        return _fit_closed_form(method, recipe, writer, images.images, Augmenter(recipe.augment,
                                                                                 recipe.data.image_size, mean, std))
    batch_size, rank_batch = recipe.train.batch_size, recipe.train.batch_size // context.world_size
    steps_per_epoch = len(images) // batch_size
    bf16 = recipe.train.precision == "bf16" or (recipe.train.precision == "auto" and device.type == "cuda")
    pipelines = build_pipelines(recipe, mean, std, device.type, bf16)
    compile_model = recipe.train.compile is True or (recipe.train.compile == "auto" and device.type == "cuda")
    if compile_model:
        for pipeline in pipelines:
            pipeline.augmenter.compile()
    with_original = recipe.method.consumes.original
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution kernels once
    model = distributed.wrap(method, context, device, recipe.model.sync_bn)
    optimizer = build_optimizer(method, recipe.optim, fused=device.type == "cuda" and recipe.optim.name != "lars")
    start_step = 0
    if state is not None:
        ckpt.load_module_state(method, state.prefixed("model"), state.path, "model")
        ckpt.restore_optimizer(optimizer, state)
        start_step = state.step
    forward = torch.compile(model) if compile_model else model

    total_steps = steps_per_epoch * recipe.train.epochs
    if state is not None and (start_step > total_steps or state.epoch != start_step // steps_per_epoch):
        raise CheckpointError(f"{state.path}: its metadata says step {start_step} of epoch {state.epoch}, which "
                              f"does not fit this run ({steps_per_epoch} steps per epoch, {total_steps} in all); "
                              "the file is corrupt: start a new run")
    warmup_steps = round(recipe.optim.warmup_epochs * steps_per_epoch)
    held_order = torch.randperm(len(images), generator=seeded_generator(device, recipe.seed, 0), device=device)
    held_images = normalize(images.gather(held_order[:HELD_BATCH]), mean, std)
    saved_step = -1

    def save(step: int, with_epoch_file: bool, metrics: dict[str, float]) -> None:
        nonlocal saved_step
        saved_step = step
        writer.save(method, step // steps_per_epoch, step, metrics, optimizer, epoch_file=with_epoch_file)

    started = time.perf_counter()
    last_log_time, last_log_step = started, start_step
    loss_sums: dict[str, torch.Tensor] = {}
    all_finite = torch.ones((), dtype=torch.bool, device=device)
    row: dict[str, float] = {}
    monitored: dict[str, float] = {}
    batches = None
    step, stopping = start_step, context.any(stop.requested, device)  # stopped while the data loaded
    model.train()
    while step < total_steps and not stopping:
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        if batches is None or index_in_epoch == 0:
            permutation = torch.randperm(len(images), generator=seeded_generator(device, recipe.seed, epoch),
                                         device=device)
            # this rank's share of each step's batch, from this step to the epoch's end
            batches = images.epoch_batches(permutation, index_in_epoch, batch_size, rank_batch, context.rank)
        batch = next(batches)
        # every random draw of the step (views, group elements) comes from this generator
        generator = seeded_generator(device, recipe.seed, 1 + epoch, step, context.rank)

        lr = learning_rate(step, total_steps, warmup_steps, recipe.optim)
        losses = training_step(forward, optimizer, pipelines, with_original, mean, std, batch, generator, lr,
                               bf16)
        step += 1
        method.after_optimizer_step(step / total_steps)

        # Accumulate on the device; the host syncs (and ranks agree) only every log_every steps.
        all_finite &= torch.isfinite(losses["loss"].detach())
        for name, value in losses.items():
            loss_sums[name] = loss_sums.get(name, 0) + value.detach().float()
        epoch_done = step % steps_per_epoch == 0
        if step % recipe.train.log_every == 0 or epoch_done or step == total_steps:
            if context.any(~all_finite, device):
                raise TrainingDiverged(
                    f"the loss became NaN/inf before step {step} (epoch {step // steps_per_epoch}); "
                    f"the last good checkpoint in {writer.run_dir} is untouched; lower optim.lr or check the data"
                )
            now = time.perf_counter()
            count = step - last_log_step
            averaged = context.mean({name: total / count for name, total in loss_sums.items()})
            row = {"step": step, "epoch": step / steps_per_epoch, "lr": lr,
                   **{name: value.item() for name, value in averaged.items()},
                   "images_per_second": count * batch_size / max(now - last_log_time, 1e-9),
                   "elapsed_seconds": now - started}
            writer.log(row)
            loss_sums, last_log_time, last_log_step = {}, now, step
            if progress is not None and context.is_main:
                progress(row | {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch})
            stopping = context.any(stop.requested, device)
        if epoch_done:
            finished_epoch = step // steps_per_epoch
            if finished_epoch % recipe.train.checkpoint_every == 0 or step == total_steps:
                save(step, with_epoch_file=True, metrics={"loss": row.get("loss", float("nan"))})
            every = recipe.train.diagnostics_every
            due = every and (finished_epoch % every == 0 or step == total_steps)
            if diagnostics is not None and due and context.is_main:
                method.eval()
                with torch.no_grad():
                    measured = diagnostics(method, held_images)
                method.train()
                writer.log({"step": step, "epoch": finished_epoch,
                            **{f"diagnostics/{k}": v for k, v in measured.items()}})
            monitor_due = recipe.train.monitor is not None and (finished_epoch % recipe.train.monitor.every == 0
                                                                or step == total_steps)
            if monitor is not None and monitor_due and context.is_main:
                method.eval()
                with torch.no_grad():
                    monitored = monitor(method, mean, std)
                method.train()
                writer.log({"step": step, "epoch": finished_epoch, **monitored})
                if progress is not None:
                    progress(row | monitored | {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch})

    if saved_step != step:
        save(step, with_epoch_file=False, metrics={"loss": row.get("loss", float("nan"))})
    wall = time.perf_counter() - started
    done_steps = step - start_step
    return RunResult(writer.run_dir, writer.last_checkpoint, step // steps_per_epoch, step,
                     row.get("loss", float("nan")), wall, done_steps * batch_size / max(wall, 1e-9),
                     interrupted=step < total_steps, is_main=context.is_main, monitor=monitored)


def _fit_closed_form(method: nn.Module, recipe: Recipe, writer: RunWriter, images: torch.Tensor,
                     augmenter: Augmenter) -> RunResult:
    """Methods whose objective has a closed-form optimum (kernel regime): one solve, one checkpoint
    (epoch 0, step 0: train.epochs and the optimiser do not apply). Every rank solves (the same seeded
    problem); rank 0 alone writes."""
    started = time.perf_counter()
    metrics = method.fit_closed_form(images, augmenter, seeded_generator(images.device, recipe.seed, 1))
    wall = time.perf_counter() - started
    writer.save(method, 0, 0, metrics)
    writer.log({"step": 0, "epoch": 0, "fit_seconds": wall, **metrics})
    return RunResult(writer.run_dir, writer.last_checkpoint, 0, 0, metrics.get("loss", float("nan")), wall,
                     len(images) / max(wall, 1e-9), interrupted=False, is_main=writer.is_main)
