"""`pretrain`, the entry point: stop signals, the process group, the set-up (setup.py), then either the
SGD loop (`train_by_sgd`: a step per batch, a log row every train.log_every steps, the epoch cadences) or
a closed-form fit for methods that declare one (`method.closed_form`). Methods are never named here."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hssl_cli.data.augment import Augmenter
from hssl_cli.data.views import ViewPipeline, draw_views
from hssl_cli.engine import distributed
from hssl_cli.engine.device import resolve_device, seeded_generator
from hssl_cli.engine.optim import learning_rate
from hssl_cli.engine.setup import RunSetup, SgdSetup, set_up_run, set_up_sgd
from hssl_cli.errors import TrainingDiverged
from hssl_cli.recipe import Recipe

Diagnostics = Callable[[nn.Module, torch.Tensor], dict[str, float]]  # (method, held normalised images)
Monitor = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, float]]  # (method, mean, std)


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


def pretrain(
    recipe: Recipe,
    output_root: Path,
    device_name: str = "auto",
    resume: str | None = None,
    progress: Callable[[dict], None] | None = None,
    stop: StopRequest | None = None,
    diagnostics: Diagnostics | None = None,
    init_from: Path | None = None,
    monitor: Monitor | None = None,
) -> RunResult:
    """Train `recipe` and write checkpoints; `progress` receives a dict per logged row; `diagnostics`
    (method, held normalised images) -> metrics runs every train.diagnostics_every epochs, in eval mode.
    `init_from`: an hssl model checkpoint or a backbone weights file (engine/initial_weights.py) whose
    weights a new run starts from. `monitor` (method, mean, std) ->
    metrics runs every train.monitor.every epochs on rank 0, in eval mode; its rows go to the log and to
    `progress`, its last values into the result. Under torchrun/srun every rank
    runs this; rank 0 alone writes files and reports progress."""
    stop = stop or StopRequest()
    # from the start: a SIGTERM while the data loads ends the run cleanly too (before its first step)
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    context, device = distributed.setup(resolve_device(device_name))
    try:
        run = set_up_run(recipe, output_root, device, context, resume, init_from, progress)
        try:
            if run.method.closed_form:
                result = fit_closed_form(run)
            else:
                result = train_by_sgd(run, set_up_sgd(run), stop, progress, diagnostics, monitor)
        finally:
            run.writer.close()
        context.barrier()  # no rank exits before rank 0 has written the last checkpoint
        return result
    finally:
        distributed.teardown(context)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


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


def train_by_sgd(run: RunSetup, sgd: SgdSetup, stop: StopRequest, progress: Callable[[dict], None] | None,
                 diagnostics: Diagnostics | None, monitor: Monitor | None) -> RunResult:
    """The loop, from the start (or resumed) step to the last: step, log, the epoch cadences (checkpoint,
    diagnostics, monitor); a final checkpoint when the last step (or a stop request) left none."""
    recipe, context, device, method, writer = run.recipe, run.context, run.device, run.method, run.writer
    train, steps_per_epoch, total_steps = recipe.train, sgd.steps_per_epoch, sgd.total_steps
    schedule = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch}  # for the progress display
    started = time.perf_counter()
    averages = LossAverages(device, sgd.start_step, train.batch_size, started)
    row: dict[str, float] = {}
    monitored: dict[str, float] = {}
    batches, saved_step = None, -1
    step, stopping = sgd.start_step, context.any(stop.requested, device)  # stopped while the data loaded
    sgd.model.train()
    while step < total_steps and not stopping:
        epoch, index_in_epoch = divmod(step, steps_per_epoch)
        if batches is None or index_in_epoch == 0:
            batches = rank_batches(run, epoch, index_in_epoch)
        batch = next(batches)
        # every random draw of the step (views, group elements) comes from this generator
        generator = seeded_generator(device, recipe.seed, 1 + epoch, step, context.rank)
        lr = learning_rate(step, total_steps, sgd.warmup_steps, recipe.optim)
        losses = training_step(sgd.forward, sgd.optimizer, sgd.pipelines, sgd.with_original, run.mean, run.std,
                               batch, generator, lr, sgd.bf16)
        step += 1
        method.after_optimizer_step(step / total_steps)
        averages.add(losses)

        epoch_done, last = step % steps_per_epoch == 0, step == total_steps
        if step % train.log_every == 0 or epoch_done or last:
            row = averages.row(step, steps_per_epoch, lr, context, writer.run_dir)
            writer.log(row)
            if progress is not None and context.is_main:
                progress(row | schedule)
            stopping = context.any(stop.requested, device)
        if not epoch_done:
            continue
        finished_epoch = step // steps_per_epoch
        if due(finished_epoch, train.checkpoint_every, last):
            saved_step = save(run, sgd, step, row, epoch_file=True)
        if diagnostics is not None and context.is_main and due(finished_epoch, train.diagnostics_every, last):
            measured = in_eval_mode(method, diagnostics, sgd.held_images)
            writer.log({"step": step, "epoch": finished_epoch,
                        **{f"diagnostics/{k}": v for k, v in measured.items()}})
        if (monitor is not None and context.is_main and train.monitor is not None
                and due(finished_epoch, train.monitor.every, last)):
            monitored = in_eval_mode(method, monitor, run.mean, run.std)
            writer.log({"step": step, "epoch": finished_epoch, **monitored})
            if progress is not None:
                progress(row | monitored | schedule)

    if saved_step != step:
        save(run, sgd, step, row, epoch_file=False)
    wall = time.perf_counter() - started
    return RunResult(writer.run_dir, writer.last_checkpoint, step // steps_per_epoch, step,
                     row.get("loss", float("nan")), wall, (step - sgd.start_step) * train.batch_size / max(wall, 1e-9),
                     interrupted=step < total_steps, is_main=context.is_main, monitor=monitored)


class LossAverages:
    """The step losses summed on the device since the last row: the host synchronises (and the ranks agree)
    only when a row is written, every train.log_every steps."""

    def __init__(self, device: torch.device, step: int, batch_size: int, started: float):
        self.device, self.batch_size, self.started = device, batch_size, started
        self.sums: dict[str, torch.Tensor] = {}
        self.all_finite = torch.ones((), dtype=torch.bool, device=device)
        self.last_time, self.last_step = started, step

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.all_finite &= torch.isfinite(losses["loss"].detach())
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()

    def row(self, step: int, steps_per_epoch: int, lr: float, context: distributed.Distributed,
            run_dir: Path) -> dict[str, float]:
        """The row of metrics.jsonl for the steps since the last row, averaged over steps and ranks; a
        NaN/inf loss on any rank since the start stops the run."""
        if context.any(~self.all_finite, self.device):
            raise TrainingDiverged(
                f"the loss became NaN/inf before step {step} (epoch {step // steps_per_epoch}); "
                f"the last good checkpoint in {run_dir} is untouched; lower optim.lr or check the data"
            )
        now = time.perf_counter()
        count = step - self.last_step
        averaged = context.mean({name: total / count for name, total in self.sums.items()})
        row = {"step": step, "epoch": step / steps_per_epoch, "lr": lr,
               **{name: value.item() for name, value in averaged.items()},
               "images_per_second": count * self.batch_size / max(now - self.last_time, 1e-9),
               "elapsed_seconds": now - self.started}
        self.sums, self.last_time, self.last_step = {}, now, step
        return row


def rank_batches(run: RunSetup, epoch: int, index_in_epoch: int) -> Iterator[torch.Tensor]:
    """This rank's share of each step's batch, from this step to the epoch's end, in the epoch's seeded
    order (the same on every rank and after a resume)."""
    permutation = torch.randperm(len(run.images), generator=seeded_generator(run.device, run.recipe.seed, epoch),
                                 device=run.device)
    batch_size = run.recipe.train.batch_size
    return run.images.epoch_batches(permutation, index_in_epoch, batch_size, batch_size // run.context.world_size,
                                    run.context.rank)


def due(finished_epoch: int, every: int, last_step: bool) -> bool:
    """An epoch cadence (`every` epochs, 0: never) is due at multiples of `every` and after the last step."""
    return bool(every) and (finished_epoch % every == 0 or last_step)


def in_eval_mode(method: nn.Module, measure: Callable[..., dict[str, float]], *inputs: torch.Tensor
                 ) -> dict[str, float]:
    """A measurement of the method in eval mode without gradients; training mode again afterwards."""
    method.eval()
    with torch.no_grad():
        measured = measure(method, *inputs)
    method.train()
    return measured


def save(run: RunSetup, sgd: SgdSetup, step: int, row: dict[str, float], epoch_file: bool) -> int:
    """last.safetensors and the training state (and epoch-NNNN.safetensors when asked); returns the step."""
    run.writer.save(run.method, step // sgd.steps_per_epoch, step, {"loss": row.get("loss", float("nan"))},
                    sgd.optimizer, epoch_file=epoch_file)
    return step


def fit_closed_form(run: RunSetup) -> RunResult:
    """Methods whose objective has a closed-form optimum (kernel regime): one solve, one checkpoint
    (epoch 0, step 0: train.epochs and the optimiser do not apply). Every rank solves (the same seeded
    problem); rank 0 alone writes."""
    recipe, writer, images = run.recipe, run.writer, run.images.images
    augmenter = Augmenter(recipe.augment, recipe.data.image_size, run.mean, run.std)
    started = time.perf_counter()
    metrics = run.method.fit_closed_form(images, augmenter, seeded_generator(images.device, recipe.seed, 1))
    wall = time.perf_counter() - started
    writer.save(run.method, 0, 0, metrics)
    writer.log({"step": 0, "epoch": 0, "fit_seconds": wall, **metrics})
    return RunResult(writer.run_dir, writer.last_checkpoint, 0, 0, metrics.get("loss", float("nan")), wall,
                     len(images) / max(wall, 1e-9), interrupted=False, is_main=writer.is_main)
