"""The `hssl` command line. Each command parses its options (declared in cli_options.py), calls one
function and renders the result (render.py). Heavy libraries (torch, escnn) are imported inside the
commands that need them, so `--help` and a bad recipe answer in a fraction of a second."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from hssl_cli import __version__, render
from hssl_cli import cli_options as options
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.measures.collapse_verdict import DEFAULT_THRESHOLD

app = typer.Typer(
    help="Equivariant and homomorphic self-supervised learning on images.\n\n"
    "Typical use: hssl pretrain recipes/quickstart.yaml, then "
    "hssl probe checkpoints/quickstart/<run>/last.safetensors",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
output = Console()
if not output.is_terminal and "COLUMNS" not in os.environ:
    output.width = 10_000  # piped or redirected: rich would cut tables at 80 columns; a file gets them whole


def user_errors(command):
    """An HsslError is one red line and exit code 2; any other exception (a bug, or an input no check
    foresaw) one line naming it and exit code 3, with the traceback under `hssl --debug` (read from the
    invocation's root context). Checkpoint notes print as one line each while the command runs."""

    @functools.wraps(command)
    def wrapper(invocation: typer.Context, **given):
        try:
            with render.notes_as_lines(console):
                return command(**given)
        except HsslError as error:
            console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as error:
            if invocation.find_root().params.get("debug"):
                raise
            text = " ".join(str(error).split())[:300]
            console.print(f"[bold red]error:[/] unexpected {type(error).__name__}: {escape(text)}; this is a bug or an "
                          "input hssl does not check yet: re-run with `hssl --debug ...` for the traceback and "
                          "report it", highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None

    # Typer reads the command's options from this signature and hands the wrapper the invocation's context
    signature = inspect.signature(command, eval_str=True)
    invocation = inspect.Parameter("invocation", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), invocation])
    return wrapper


def show(report: dict | list, as_json: bool, print_table: Callable[[Console, Any], None]) -> None:
    """A command's result: one JSON object (--json) or its rich rendering."""
    if as_json:
        output.print_json(json.dumps(report))
    else:
        print_table(output, report)


def _version(value: bool) -> None:
    if value:
        output.print(f"hssl {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error "
                                        "(a bug report's first need).")] = False,
) -> None:
    """Equivariant and homomorphic self-supervised learning on images."""
    # --debug stays in this (root) context's params, where user_errors reads it


@app.command()
@user_errors
def pretrain(
    recipe_path: options.RecipeArgument,
    overrides: options.RecipeOverrides = None,
    output_dir: options.RunsRoot = Path("checkpoints"),
    resume: options.Resume = None,
    device: options.Device = "auto",
    init_from: options.InitFrom = None,
    check: options.CheckOnly = False,
) -> None:
    """Train a self-supervised model from a recipe and write .safetensors checkpoints.

    The run folder <output>/<name>/<timestamp>/ gets last.safetensors, epoch-NNNN.safetensors every \
train.checkpoint_every epochs, last.state.safetensors (to resume), metrics.jsonl (one JSON row every \
train.log_every steps) and the resolved recipe.yaml.

    SIGTERM or SIGUSR1 (pre-emption) writes a checkpoint and exits with code 143; --resume continues \
the run, bit for bit on the CPU. A NaN/inf loss stops the run and leaves the last good checkpoint.

    Example: hssl pretrain recipes/quickstart.yaml --set train.epochs=2 --device cpu
    """
    from hssl_cli.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    if check:
        from hssl_cli.recipe import recipe_to_yaml

        output.print(recipe_to_yaml(recipe), markup=False, highlight=False, soft_wrap=True, end="")
        return
    from hssl_cli.engine.train import pretrain as run_pretrain
    from hssl_cli.evaluate.measures.spectrum import training_diagnostics
    from hssl_cli.evaluate.monitor import online_monitor

    monitor = online_monitor(recipe)
    with render.TrainingProgress(console, f"pretrain {recipe.name}") as progress:
        result = run_pretrain(recipe, output_dir, device_name=device, resume=resume, progress=progress.update,
                              diagnostics=training_diagnostics, init_from=init_from, monitor=monitor)
    if not result.is_main:
        raise typer.Exit(143 if result.interrupted else 0)
    render.print_pretrain(output, recipe.name, result)
    if result.interrupted:
        raise typer.Exit(143)


@app.command()
@user_errors
def probe(
    checkpoint: options.CheckpointArgument,
    dataset: options.Dataset = None,
    data_root: options.DataRoot = None,
    features: options.Features = "backbone",
    train_samples: options.TrainSamples = None,
    test_samples: options.TestSamples = None,
    labels: options.LabelPercentage = "100%",
    protocol: options.Protocol = "fast",
    epochs: options.Epochs = None,
    lr: options.LearningRate = None,
    batch_size: options.BatchSize = None,
    weight_decay: options.WeightDecay = None,
    backbone_lr_scale: options.BackboneLrScale = None,
    optimizer: options.Optimizer = None,
    test_rotations: options.TestRotation = None,
    validation: options.Validation = False,
    cache: options.FeatureCache = True,
    exact_kernel_knn: options.ExactKernelKnn = False,
    augmentation: options.Augmentation = False,
    as_json: options.ProbeJson = False,
    device: options.Device = "auto",
    verify: options.Verify = True,
) -> None:
    """Evaluate a checkpoint (no recipe file needed): linear and kNN on its frozen features, or fine-tuning.

    Features of the train and test splits are extracted once (and cached). --protocol fast (default): a \
softmax classifier trained full-batch (L-BFGS) on standardised features, its weight decay chosen on a \
held-out 10% of train. --protocol standard: the papers' SGD linear evaluation with crop+flip augmentation \
(comparable with published numbers; slow on a CPU). Both: a weighted kNN (cosine, k=20 and k=200, \
temperature 0.07) votes. --protocol finetune: the backbone and a linear head trained end to end (not a frozen \
evaluation: not comparable with the others). Top-1/top-5 on the test split; --json says which protocol made \
each number.

    Examples: hssl probe checkpoints/quickstart/20261123-120000/last.safetensors --json; \
hssl probe CKPT --labels 1% --train-subset 20000; hssl probe CKPT --protocol standard --epochs 100; \
hssl probe CKPT --protocol finetune --labels 10%; hssl probe CKPT --augmentation
    """
    if augmentation:
        from hssl_cli.evaluate.commands.augmentation_probe import augmentation_probe

        given = [name for name, differs in (
            ("--dataset", dataset is not None), ("--data-root", data_root is not None),
            ("--features", features != "backbone"), ("--test-samples", test_samples is not None),
            ("--labels", labels != "100%"), ("--protocol", protocol != "fast"),
            ("--epochs/--lr/--batch-size/--weight-decay/--backbone-lr-scale/--optimizer",
             any(value is not None for value in (epochs, lr, batch_size, weight_decay, backbone_lr_scale, optimizer))),
            ("--test-rotation", bool(test_rotations)), ("--validation", validation),
            ("--exact-kernel-knn", exact_kernel_knn)) if differs]
        report = augmentation_probe(checkpoint, samples=4096 if train_samples is None else train_samples,
                                    device_name=device, verify=verify, refused_options=given)
        show(report, as_json, render.print_augmentation_probe)
        return
    from hssl_cli.evaluate.commands.probe import probe_checkpoint, training_protocols

    sgd, finetune = training_protocols(protocol, epochs, lr, batch_size, weight_decay, backbone_lr_scale, optimizer)
    report = probe_checkpoint(checkpoint, dataset=dataset, data_root=data_root, features=features,
                              device_name=device, progress=not as_json, train_samples=train_samples,
                              test_samples=test_samples, test_rotations=test_rotations or [],
                              validation=validation, verify=verify, labels=labels, protocol=protocol, sgd=sgd,
                              cache=cache, exact_kernel_knn=exact_kernel_knn, finetune=finetune)
    show(report, as_json, render.print_probe)


@app.command("collapse-report", help=options.COLLAPSE_REPORT_HELP)
@user_errors
def collapse_report(
    checkpoints: options.CheckpointsArgument,
    dataset: options.Dataset = None,
    data_root: options.DataRoot = None,
    split: options.SampleSplit = None,
    samples: options.CollapseSamples = 2048,
    threshold: options.Threshold = DEFAULT_THRESHOLD,
    plot: options.SpectrumPlot = None,
    labels: options.CheckpointLabel = None,
    shared_axes: options.SharedAxes = True,
    as_json: options.CollapseJson = False,
    device: options.Device = "auto",
    verify: options.Verify = True,
) -> None:
    from hssl_cli.evaluate.commands.collapse_report import collapse_reports

    reports = collapse_reports(checkpoints, dataset=dataset, data_root=data_root, split=split, samples=samples,
                               threshold=threshold, device_name=device, progress=not as_json, verify=verify,
                               plot=plot, labels=labels, shared_axes=shared_axes)
    if as_json:
        output.print_json(json.dumps(reports[0] if len(reports) == 1 else reports))
        return
    for report in reports:
        render.print_collapse(output, report)


@app.command()
@user_errors
def export(
    checkpoint: options.CheckpointArgument,
    out: options.ExportOut,
    format: options.ExportFormat = "plain",
    verify: options.Verify = True,
) -> None:
    """Write a checkpoint's backbone as a plain state_dict, to load outside hssl.

    The file's metadata says how to build the architecture (for torchvision/timm: resnet18 with the CIFAR \
stem, a 3x3 stride-1 conv1 and no max-pool, and no classifier) and holds the preprocessing statistics \
(data_mean, data_std). Then: model.load_state_dict(safetensors.torch.load_file(OUT), strict=True).

    Example: hssl export checkpoints/run/<run>/last.safetensors --format torchvision --out resnet18.safetensors
    """
    from hssl_cli.evaluate.commands.export import export_backbone

    render.print_export(output, export_backbone(checkpoint, out, format=format, verify=verify))


@app.command()
@user_errors
def shards(
    folder: options.ImageFolderArgument,
    out: options.ShardsFolderArgument,
    splits: options.ShardsSplit = None,
    size: options.ResizeTo = None,
    per_shard: options.PerShard = 10_000,
) -> None:
    """Pack an image folder into tar shards (webdataset layout) with a manifest.

    Each shard <split>-NNNNNN.tar holds IIIIIIII.jpg|png and IIIIIIII.cls per image (I: its index in the \
split, class-then-name order; .cls: its class index); manifest.json, written last, lists every shard \
with its size and SHA-256. A pack that was killed has no manifest and is refused by readers.

    Example: hssl shards ~/data/imagenet100 /scratch/imagenet100-shards --size 256 --per-shard 5000
    """
    from hssl_cli.data.shards import MANIFEST, pack_folder

    manifest = pack_folder(folder, out, splits, per_shard, size, progress=render.progress_bars(True))
    render.print_shards(output, folder, out, manifest, out / MANIFEST, size)


@app.command()
@user_errors
def plot(
    runs: options.RunsArgument,
    out: options.FigureOut = Path("curves.png"),
    metrics: options.Panels = None,
    labels: options.RunLabel = None,
    title: options.FigureTitle = None,
) -> None:
    """Overlay the training curves of several runs: one panel per metric against epochs, one colour per run.

    Reads each run's metrics.jsonl (loss, lr, the online monitor's accuracy, the collapse diagnostics' \
effective rank per layer, and whatever else the method logs). A resumed run is drawn once: rows of a \
killed run after its last checkpoint are replaced by the resumed run's.

    Example: hssl plot checkpoints/simclr_cifar10_cpu checkpoints/byol_cifar10_cpu --out curves.pdf
    """
    from hssl_cli.evaluate.commands.plot import DEFAULT_PANELS, plot_runs, read_runs

    curves = read_runs(runs, labels)
    panels = plot_runs(curves, out, metrics or DEFAULT_PANELS, title)
    output.print(f"wrote {out}: {len(curves)} run(s), panels {', '.join(panels)}", soft_wrap=True, highlight=False,
                 markup=False)


@app.command("equivariance-check")
@user_errors
def equivariance_check(
    checkpoint: options.OptionalCheckpointArgument = None,
    recipe_path: options.CheckRecipe = None,
    group: options.TestGroup = None,
    expect_invariant: options.ExpectInvariant = False,
    samples: options.EquivarianceSamples = 64,
    tolerance: options.Tolerance = 1e-4,
    data_root: options.RecipeDataRoot = None,
    as_json: options.EquivarianceJson = False,
    device: options.Device = "auto",
    verify: options.Verify = True,
) -> None:
    """Does a model have the symmetries its backbone promises: rotations/flips, translations, scale levels?

    Rotations/flips of a test group (--group): per layer of an e2_* backbone ||f(T_g x) - L_g f(x)|| / ||f(x)||; \
for any backbone the invariance of the pooled features and the embedding, per element and under augmentations. \
Translations: any CNN's last map shifted by its stride (whole cells) and half of it (images over 96 px: their \
96-px centre). Scale levels: each stage of a lifting (model.scales), the image average-pooled and bilinearly resized.

    Exact elements (multiples of 90 degrees, flips, whole cells, average pooling) move pixels without \
interpolation; others (45 degrees, half a cell, bilinear) are reported, never gated. Gated, at exact elements, \
is what the backbone promises: an e2_* backbone's own group, shifts of any CNN map, a lifting's levels; not a \
plain CNN's rotation invariance, unless --expect-invariant asserts it. Every row says if it is gated and why. \
Exit code 1 when a gated error exceeds --tolerance, else 0.

    Examples: rotations: hssl equivariance-check --recipe recipes/hssl_rotmnist_c8.yaml --group D4; translations: \
hssl equivariance-check --recipe recipes/hssl_translation_cifar10_cpu.yaml; scales: hssl equivariance-check \
--recipe recipes/hssl_scales_cifar10_cpu.yaml; a plain CNN you assert invariant: CKPT --expect-invariant
    """
    from hssl_cli.evaluate.commands.equivariance_check import check_equivariance

    report = check_equivariance(checkpoint, recipe_path, group=group, samples=samples, tolerance=tolerance,
                                device_name=device, data_root=data_root, verify=verify,
                                expect_invariant=expect_invariant)
    show(report, as_json, render.print_equivariance)
    if not report["passed"]:
        raise typer.Exit(1)


@app.command()
@user_errors
def sweep(
    suite_path: options.SuiteArgument,
    cell: options.CellIndex = None,
    overrides: options.SuiteOverrides = None,
    list_cells: options.ListCells = False,
    report_only: options.ReportOnly = False,
    as_json: options.SweepJson = False,
    output_dir: options.SuitesRoot = Path("checkpoints/sweeps"),
    device: options.Device = "auto",
) -> None:
    """Run a suite of experiments: recipes x overrides (x a swept key) x seeds, one cell each.

    A cell is one pretrain, then a probe (and, if the suite asks, collapse-report and equivariance-check), \
in its own folder; its result.json marks it finished. Finished cells are skipped, a killed cell resumes its \
pretraining, and a cell another `hssl sweep` process is running is left to it: start two processes on \
one suite to use two GPUs or two cores. A suite edited after cells finished is refused rather than mixed; \
seeds may be added (the finished cells are reused), and so may variants and claims.

    Claims (`claims:` in the suite, e.g. {a: hssl, b: assl, metric: linear, test: equivalent, margin: 1.0}) \
are decided from the cells of a and b with the same seed: d = a - b per seed, its mean and 95% t interval \
(n - 1 degrees of freedom). greater: "greater" when the interval lies above 0, "reversed" below 0; \
equivalent: "equivalent" when it lies inside ±margin (two one-sided tests), "not equivalent" when it lies \
outside; otherwise "not resolved at n seeds", with the seeds that would resolve the observed effect.

    Examples: hssl sweep suites/hssl_rotmnist.yaml (run every cell, then print the report); \
hssl sweep S.yaml --list; hssl sweep S.yaml --cell 3; hssl sweep S.yaml --report --json
    """
    from hssl_cli.sweep.execute import cell_statuses, run_cells, select_cells, write_report
    from hssl_cli.sweep.report import as_json as report_json
    from hssl_cli.sweep.suite import load_suite

    loaded = load_suite(suite_path, overrides or [])
    cells = select_cells(loaded, cell)
    if list_cells:
        rows = cell_statuses(loaded, cells, output_dir)
        show(rows, as_json, functools.partial(render.print_cells, title=f"{loaded.path}: {len(loaded.cells)} cells"))
        return
    if not report_only:
        if run_cells(loaded, cells, output_dir, device, console):
            raise typer.Exit(143)
        if cell is not None:
            return
    command = " ".join(["hssl sweep", str(suite_path), *(f"--set {o}" for o in overrides or [])])
    written = write_report(loaded, output_dir, command)
    if as_json:
        output.print_json(json.dumps(report_json(written.report)))
        return
    render.print_sweep_report(output, loaded.name, written)


def main() -> None:
    app()
