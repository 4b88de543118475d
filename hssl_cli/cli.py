"""The `hssl` command line. Each command parses its options, calls one engine function and renders
the result with rich. Heavy libraries (torch, escnn) are imported inside the commands that need them,
so `--help` and a bad recipe answer in a fraction of a second."""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from hssl_cli import __version__
from hssl_cli.errors import CheckpointNote, HsslError
from hssl_cli.evaluate.verdict import DEFAULT_THRESHOLD, VERDICT_RULE
from hssl_cli.files import write_text_atomically
from hssl_cli.render import (
    TrainingProgress,
    print_augmentation_probe,
    print_cells,
    print_collapse,
    print_equivariance,
    print_pretrain,
    print_probe,
    progress_bars,
)

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


DEBUG = {"traceback": False}  # `hssl --debug CMD`: let unexpected exceptions keep their traceback


def _print_note(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, CheckpointNote):
        console.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def user_errors(command):
    """An HsslError is one red line and exit code 2; any other exception (a bug, or an input no check
    foresaw) one line naming it and exit code 3, with the traceback under `hssl --debug`."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _print_note
        try:
            return command(*args, **kwargs)
        except HsslError as error:
            console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as error:
            if DEBUG["traceback"]:
                raise
            text = " ".join(str(error).split())[:300]
            console.print(f"[bold red]error:[/] unexpected {type(error).__name__}: {escape(text)}; this is a bug or an "
                          "input hssl does not check yet: re-run with `hssl --debug ...` for the traceback and "
                          "report it", highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None
        finally:
            warnings.showwarning = _show_warning

    return wrapper


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
    DEBUG["traceback"] = debug


VerifyOption = Annotated[bool, typer.Option(
    "--verify/--no-verify", help="Check the checkpoint's tensors against the checksum in its metadata "
    "(--no-verify skips it: faster on large files).")]
CheckpointArgument = Annotated[Path, typer.Argument(
    metavar="CKPT", help="A model checkpoint or run folder. Example: checkpoints/quickstart/<run>/last.safetensors",
    show_default=False)]
DatasetOption = Annotated[str | None, typer.Option(
    "--dataset", help="Use another dataset than the checkpoint's (digits, mnist, cifar10, stl10, imagefolder). "
    "Example: --dataset cifar10 --data-root ~/data/cifar10")]
DataRootOption = Annotated[str | None, typer.Option(
    "--data-root", help="Folder of the dataset files (default: the checkpoint's data.root).")]
DeviceOption = Annotated[str, typer.Option(
    "--device", help="cpu, cuda or auto (cuda when one is visible). Example: --device cpu")]


@app.command()
@user_errors
def pretrain(
    recipe_path: Annotated[Path, typer.Argument(
        metavar="RECIPE", help="Recipe YAML. Example: recipes/quickstart.yaml", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe key, typed by the schema; repeatable. "
        "Example: --set optim.lr=0.2 --set train.epochs=5")] = None,
    output_dir: Annotated[Path, typer.Option(
        "--output", help="Root of run folders: <output>/<recipe name>/<timestamp>/. Example: --output /scratch/runs")
    ] = Path("checkpoints"),
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue a killed run: a run folder, its last.safetensors, or 'auto' (the newest "
        "complete run of this recipe under --output, or a new run when there is none yet: what a requeued "
        "job wants). The recipe must match the run's. Example: --resume auto")
    ] = None,
    device: DeviceOption = "auto",
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Start a new run from a checkpoint's weights (same architecture; the optimiser, the "
        "schedule and the step start afresh): fine-tuning, or a longer run than the first. "
        "Example: --init-from checkpoints/run/<run>/last.safetensors")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Validate the recipe (with --set) and print it resolved, every default filled in, "
        "as YAML; train nothing.")] = False,
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
    from hssl_cli.evaluate.spectrum import training_diagnostics

    monitor = None
    if recipe.train.monitor is not None:
        from hssl_cli.evaluate.monitor import OnlineMonitor

        monitor = OnlineMonitor(recipe)
    with TrainingProgress(console, f"pretrain {recipe.name}") as progress:
        result = run_pretrain(recipe, output_dir, device_name=device, resume=resume, progress=progress.update,
                              diagnostics=training_diagnostics, init_from=init_from, monitor=monitor)
    if not result.is_main:
        raise typer.Exit(143 if result.interrupted else 0)
    print_pretrain(output, recipe.name, result)
    if result.interrupted:
        raise typer.Exit(143)


@app.command()
@user_errors
def probe(
    checkpoint: CheckpointArgument,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    features: Annotated[str, typer.Option(
        "--features", help="backbone (f(x), the usual choice) or projector (the method's embedding of one view, "
        "as its loss sees it: g(f(x)), or the head on one fibre for H-SSL).")] = "backbone",
    train_samples: Annotated[int | None, typer.Option(
        "--train-samples", "--train-subset", help="Fit the probes on a fixed random subset of train (default: all): "
        "a quick probe of a large split. Example: --train-samples 6000")] = None,
    test_samples: Annotated[int | None, typer.Option(
        "--test-samples", "--test-subset", help="Score on a fixed random subset of test (default: all). "
        "Example: --test-samples 3000")] = None,
    labels: Annotated[str, typer.Option(
        "--labels", help="Low-label evaluation: keep this percentage of each class's train labels (a fixed, seeded "
        "subset, the same for every checkpoint). Example: --labels 1%")] = "100%",
    protocol: Annotated[str, typer.Option(
        "--protocol", help="fast: L-BFGS softmax regression on standardised features of unaugmented images (one "
        "backbone pass; seconds). standard: the papers' linear evaluation, SGD on features of crop+flip views drawn "
        "every epoch (one backbone pass per image per epoch; see --epochs, --lr, --batch-size).")] = "fast",
    epochs: Annotated[int, typer.Option("--epochs", help="--protocol standard: epochs of SGD.")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="--protocol standard: learning rate for batch 256, scaled "
                                      "linearly with --batch-size; cosine schedule.")] = 0.1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="--protocol standard: images per SGD step.")] = 256,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="--protocol standard: weight decay.")] = 0.0,
    test_rotations: Annotated[list[float] | None, typer.Option(
        "--test-rotation", help="Also score the same probes on the test images rotated by this angle in degrees "
        "(bilinear); repeatable. Example: --test-rotation 17 --test-rotation 100")] = None,
    validation: Annotated[bool, typer.Option(
        "--validation", help="Score on held-out train images (--test-samples of them, default 10%), never on "
        "test: the split to choose settings on.")] = False,
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Keep the extracted features (safetensors in $HSSL_CACHE_DIR/features, default "
        "~/.cache/hssl/features, keyed by a hash of the weights and the images), so the next probe of the same "
        "checkpoint and data skips the extraction.")] = True,
    exact_kernel_knn: Annotated[bool, typer.Option(
        "--exact-kernel-knn", help="Kernel-regime checkpoints (method kernel): also a kNN whose similarity is the "
        "base kernel itself, evaluated exactly on the normalised pixels (random Fourier features: the RBF kernel "
        "they approximate): knn_k20_exact_kernel, knn_k200_exact_kernel.")] = False,
    augmentation: Annotated[bool, typer.Option(
        "--augmentation", help="Instead of the class labels, predict each view's augmentation parameters a_t "
        "(crop box, flip, jitter factors, ...) from [f(x), f(t(x))]: ridge regression on --train-samples train "
        "images (default 4096), R² per parameter on the held-out half. Near 0: the features are invariant to "
        "the augmentation; EquiMod's claim is that its features keep it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    device: DeviceOption = "auto",
    verify: VerifyOption = True,
) -> None:
    """Linear and kNN evaluation of the frozen features of a checkpoint (no recipe file needed).

    Features of the train and test splits are extracted once (and cached). --protocol fast (default): a \
softmax classifier trained full-batch (L-BFGS) on standardised features, its weight decay chosen on a \
held-out 10% of train. --protocol standard: the papers' SGD linear evaluation with crop+flip augmentation \
(comparable with published numbers; slow on a CPU). Both: a weighted kNN (cosine, k=20 and k=200, \
temperature 0.07) votes. Top-1/top-5 on the test split; --json says which protocol made each number.

    Examples: hssl probe checkpoints/quickstart/20261123-120000/last.safetensors --json; \
hssl probe CKPT --labels 1% --train-subset 20000; hssl probe CKPT --protocol standard --epochs 100; \
hssl probe CKPT --augmentation
    """
    from hssl_cli.evaluate.linear_sgd import SgdProtocol
    from hssl_cli.evaluate.probe_checkpoint import probe_checkpoint

    if augmentation:
        from hssl_cli.evaluate.augmentation_probe import augmentation_probe

        unused = [name for name, given in (
            ("--dataset", dataset is not None), ("--data-root", data_root is not None),
            ("--features", features != "backbone"), ("--test-samples", test_samples is not None),
            ("--labels", labels != "100%"), ("--protocol", protocol != "fast"),
            ("--test-rotation", bool(test_rotations)), ("--validation", validation),
            ("--exact-kernel-knn", exact_kernel_knn)) if given]
        if unused:
            raise HsslError(f"--augmentation regresses the recipe's own augmentation parameters on its train split "
                            f"and takes only --train-samples; drop {', '.join(unused)}")
        report = augmentation_probe(checkpoint, samples=4096 if train_samples is None else train_samples,
                                    device_name=device, verify=verify)
        if as_json:
            output.print_json(json.dumps(report))
        else:
            print_augmentation_probe(output, report)
        return

    for name, value, low in (("--epochs", epochs, 1), ("--batch-size", batch_size, 2)):
        if value < low:
            raise HsslError(f"{name} {value}: give at least {low}")
    if not (0 < lr <= 100 and 0 <= weight_decay <= 10):
        raise HsslError(f"--lr {lr:g} / --weight-decay {weight_decay:g}: give 0 < lr <= 100 and "
                        "0 <= weight decay <= 10")
    report = probe_checkpoint(checkpoint, dataset=dataset, data_root=data_root, features=features,
                              device_name=device, progress=not as_json, train_samples=train_samples,
                              test_samples=test_samples, test_rotations=test_rotations or [],
                              validation=validation, verify=verify, labels=labels, protocol=protocol,
                              sgd=SgdProtocol(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay),
                              cache=cache, exact_kernel_knn=exact_kernel_knn)
    if as_json:
        output.print_json(json.dumps(report))
        return
    print_probe(output, report)


@app.command("collapse-report", help=f"""Is the representation collapsing? Covariance spectra of a checkpoint's layers.

    On a fixed sample of images (no augmentation), each layer the method has (backbone features f(x), \
projector output z, predictor output q(z)) gets: effective rank (exp of the entropy of the normalised \
eigenvalues of the standardised features, i.e. of the correlation matrix: what a linear probe sees; the raw \
covariance's is shown too), RankMe (on the singular values of the uncentred embeddings), participation \
ratio, the mean std of L2-normalised embeddings next to the healthy 1/sqrt(D), the number of correlation \
eigenvalues below THRESHOLD x the largest, and a verdict. Where there is a predictor (BYOL, DirectPred, \
IsoLoss): the alignment of its eigenvectors with those of the correlation z^T z / N (1: aligned).

    Verdict rule, per layer: {VERDICT_RULE}. The checkpoint's verdict is its projector's (the backbone's \
when there is no projector).

    Several checkpoints (a run's epochs, or methods side by side): a table each, and with --plot one figure \
with their spectra overlaid per layer, on the same data sample.

    Examples: hssl collapse-report checkpoints/quickstart/20261123-120000/last.safetensors --plot spectrum.png; \
hssl collapse-report RUN/epoch-0010.safetensors RUN/epoch-0100.safetensors --plot spectra.pdf
""")
@user_errors
def collapse_report(
    checkpoints: Annotated[list[Path], typer.Argument(
        metavar="CKPT...", show_default=False,
        help="Model checkpoints or run folders. Example: checkpoints/quickstart/<run>/last.safetensors")],
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    split: Annotated[str | None, typer.Option(
        "--split", help="Split to sample (default: the data's test split). Example: --split train")] = None,
    samples: Annotated[int, typer.Option(
        "--samples", help="Images in the sample (fewer when the split is smaller); at least the layer width "
        "D, or only N-1 eigenvalues exist. Example: --samples 4096")] = 2048,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="An eigenvalue below this fraction of the largest counts as a collapsed dimension. "
        "Example: --threshold 1e-4")] = DEFAULT_THRESHOLD,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write a figure (.png, .pdf or .svg): one log-scale panel per layer, the spectra of every "
        "checkpoint overlaid, titled with the dataset. Example: --plot spectra.pdf")] = None,
    labels: Annotated[list[str] | None, typer.Option(
        "--label", help="The legend label of each checkpoint, in order (default: method, backbone, epoch); "
        "repeatable. Example: --label SimCLR --label BYOL")] = None,
    shared_axes: Annotated[bool, typer.Option(
        "--shared-axes/--separate-axes", help="Panels share their y-axis (compare layers at a glance) or each "
        "gets its own range.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (with the eigenvalues; a list for "
                                          "several checkpoints) instead of the table.")] = False,
    device: DeviceOption = "auto",
    verify: VerifyOption = True,
) -> None:
    from hssl_cli.evaluate.collapse_report import collapse_report as run_report
    from hssl_cli.evaluate.spectrum import plot_spectra

    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise HsslError(f"--plot {plot}: give a .png, .pdf or .svg file")
    if labels and len(labels) != len(checkpoints):
        raise HsslError(f"--label given {len(labels)} time(s) for {len(checkpoints)} checkpoint(s); give one each "
                        "or none")
    reports = [run_report(checkpoint, dataset=dataset, data_root=data_root, split=split, samples=samples,
                          threshold=threshold, device_name=device, progress=not as_json, verify=verify)
               for checkpoint in checkpoints]
    if plot is not None:
        plot_spectra(reports, plot, labels, shared_axes)
        for report in reports:
            report["plot"] = str(plot)
    if as_json:
        output.print_json(json.dumps(reports[0] if len(reports) == 1 else reports))
        return
    for report in reports:
        print_collapse(output, report)


@app.command()
@user_errors
def export(
    checkpoint: CheckpointArgument,
    out: Annotated[Path, typer.Option(
        "--out", help="The .safetensors file to write. Example: --out backbone.safetensors", show_default=False)],
    format: Annotated[str, typer.Option(
        "--format", help="plain: the backbone's state_dict for hssl_cli.load_backbone / build_backbone; torchvision "
        "or timm (resnet18_cifar only): the same tensors under those libraries' ResNet-18 names.")] = "plain",
    verify: VerifyOption = True,
) -> None:
    """Write a checkpoint's backbone as a plain state_dict, to load outside hssl.

    The file's metadata says how to build the architecture (for torchvision/timm: resnet18 with the CIFAR \
stem, a 3x3 stride-1 conv1 and no max-pool, and no classifier) and holds the preprocessing statistics \
(data_mean, data_std). Then: model.load_state_dict(safetensors.torch.load_file(OUT), strict=True).

    Example: hssl export checkpoints/run/<run>/last.safetensors --format torchvision --out resnet18.safetensors
    """
    from hssl_cli.evaluate.export import export_backbone

    report = export_backbone(checkpoint, out, format=format, verify=verify)
    output.print(f"wrote {report['out']}: {report['tensors']} tensors of a {report['architecture']} backbone "
                 f"({report['feature_dim']} features); build it with: {report['build']}", soft_wrap=True,
                 highlight=False, markup=False)


@app.command()
@user_errors
def shards(
    folder: Annotated[Path, typer.Argument(
        help="An image folder: <folder>/<split>/<class>/*.jpg|png (the imagefolder layout), or a folder of "
        "images (one unlabeled split, train).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The folder to write the shards and manifest.json into.",
                                        show_default=False)],
    splits: Annotated[list[str] | None, typer.Option(
        "--split", help="Pack only this split; repeatable (default: every split). Example: --split train")] = None,
    size: Annotated[int | None, typer.Option(
        "--size", min=8, max=4096, help="Pre-resize every image to SIZE x SIZE (antialiased bilinear, as "
        "training resizes) and store it as PNG (lossless); default: the files' own bytes.")] = None,
    per_shard: Annotated[int, typer.Option(
        "--per-shard", min=1, help="Images per shard (the last may hold fewer).")] = 10_000,
) -> None:
    """Pack an image folder into tar shards (webdataset layout) with a manifest.

    Each shard <split>-NNNNNN.tar holds IIIIIIII.jpg|png and IIIIIIII.cls per image (I: its index in the \
split, class-then-name order; .cls: its class index); manifest.json, written last, lists every shard \
with its size and SHA-256. A pack that was killed has no manifest and is refused by readers.

    Example: hssl shards ~/data/imagenet100 /scratch/imagenet100-shards --size 256 --per-shard 5000
    """
    from rich.table import Table

    from hssl_cli.data.shards import MANIFEST, pack_folder

    manifest = pack_folder(folder, out, splits, per_shard, size, progress=progress_bars(True))
    table = Table(title=f"{folder} -> {out}")
    for column in ("split", "images", "classes", "shards", "MB"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in manifest["splits"].items():
        megabytes = sum(shard["bytes"] for shard in split["shards"]) / 2**20
        table.add_row(name, str(split["count"]), str(len(split["classes"]) or "unlabeled"),
                      str(len(split["shards"])), f"{megabytes:.1f}")
    output.print(table)
    output.print(f"wrote {out / MANIFEST}" + (f"; images resized to {size} px, stored as PNG" if size else ""),
                 soft_wrap=True, highlight=False, markup=False)


@app.command()
@user_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(
        metavar="RUN...", help="Run folders, checkpoints in them, or folders of runs (all runs below). "
        "Example: checkpoints/quickstart/20261203-065817 checkpoints/simclr_cifar10", show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", help="The figure: .png, .pdf or .svg. Example: --out curves.pdf")] = Path("curves.png"),
    metrics: Annotated[list[str] | None, typer.Option(
        "--metric", help="Panels to draw: metric names of metrics.jsonl, * as a wildcard; repeatable "
        "(default: loss, lr, monitor/*, diagnostics/*/effective_rank). Example: --metric 'diagnostics/*/rankme'")
    ] = None,
    labels: Annotated[list[str] | None, typer.Option(
        "--label", help="A legend label per run, in order (default: <recipe name>/<run folder>); repeatable.")
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="The figure's title.")] = None,
) -> None:
    """Overlay the training curves of several runs: one panel per metric against epochs, one colour per run.

    Reads each run's metrics.jsonl (loss, lr, the online monitor's accuracy, the collapse diagnostics' \
effective rank per layer, and whatever else the method logs). A resumed run is drawn once: rows of a \
killed run after its last checkpoint are replaced by the resumed run's.

    Example: hssl plot checkpoints/simclr_cifar10_cpu checkpoints/byol_cifar10_cpu --out curves.pdf
    """
    from hssl_cli.evaluate.curves import DEFAULT_PANELS, plot_runs, read_run, run_folders

    folders = run_folders(runs)
    if labels and len(labels) != len(folders):
        raise HsslError(f"--label given {len(labels)} time(s) for {len(folders)} run(s); give one per run or none")
    curves = [read_run(folder, label) for folder, label in zip(folders, labels or [None] * len(folders), strict=True)]
    panels = plot_runs(curves, out, metrics or DEFAULT_PANELS, title)
    output.print(f"wrote {out}: {len(curves)} run(s), panels {', '.join(panels)}", soft_wrap=True, highlight=False,
                 markup=False)


@app.command("equivariance-check")
@user_errors
def equivariance_check(
    checkpoint: Annotated[Path | None, typer.Argument(
        metavar="[CKPT]", help="A model checkpoint or run folder (or use --recipe). "
        "Example: checkpoints/hssl_rotmnist_c8/<run>/last.safetensors", show_default=False)] = None,
    recipe_path: Annotated[Path | None, typer.Option(
        "--recipe", help="Check the untrained model that a recipe builds instead of a checkpoint: an architecture "
        "check before spending GPU time. Example: --recipe recipes/hssl_rotmnist_c8.yaml")] = None,
    group: Annotated[str | None, typer.Option(
        "--group", help="Test group C<N> or D<N> (default: the model's group; C4 for ordinary backbones). "
        "Example: --group D4")] = None,
    samples: Annotated[int, typer.Option(
        "--samples", help="Test images: a fixed random subset of the test split. Example: --samples 256")] = 64,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="Exit code 1 when an error at an exact element (multiples of 90 degrees, flips) "
        "exceeds this. Example: --tolerance 1e-5")] = 1e-4,
    data_root: Annotated[str | None, typer.Option(
        "--data-root", help="Folder of the dataset files (default: the recipe's data.root).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the tables.")] = False,
    device: DeviceOption = "auto",
    verify: VerifyOption = True,
) -> None:
    """How equivariant is each layer, how invariant are the features, under a rotation/flip group?

    Equivariant (e2_*) backbones: per layer ||f(T_g x) - L_g f(x)|| / ||f(x)|| for every element g of the \
test group (L_g moves the map and permutes the fibres). Any backbone: the invariance error of the pooled \
features and of the embedding under the group, and under one draw of the recipe's augmentations. Multiples \
of 90 degrees and flips are exact pixel permutations; other angles interpolate, so their errors are shown \
but not gated.

    Exit code 0 when every error at an exact element is within --tolerance, 1 otherwise (scripts can gate on it).

    Example: hssl equivariance-check --recipe recipes/hssl_rotmnist_c8.yaml --group C4 --tolerance 1e-5
    """
    from hssl_cli.evaluate.equivariance import check_equivariance

    report = check_equivariance(checkpoint, recipe_path, group=group, samples=samples, tolerance=tolerance,
                                device_name=device, data_root=data_root, verify=verify)
    if as_json:
        output.print_json(json.dumps(report))
    else:
        print_equivariance(output, report)
    if not report["passed"]:
        raise typer.Exit(1)


@app.command()
@user_errors
def sweep(
    suite_path: Annotated[Path, typer.Argument(
        metavar="SUITE", help="Suite YAML. Example: suites/hssl_rotmnist.yaml", show_default=False)],
    cell: Annotated[int | None, typer.Option(
        "--cell", help="Run only cell N (0-based, see --list): one SLURM array task or one job of a shell loop. "
        "Example: --cell $SLURM_ARRAY_TASK_ID")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe key in every cell (after the suite's own overrides); repeatable. "
        "Example: --set data.root=~/data/mnist")] = None,
    list_cells: Annotated[bool, typer.Option("--list", help="List the cells and their status; run nothing.")] = False,
    report_only: Annotated[bool, typer.Option(
        "--report", help="Run nothing: aggregate the finished cells into a table (mean ± std over seeds), "
        "written as report.md, report.csv and report.png beside the cells.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --report or --list: print JSON instead.")] = False,
    output_dir: Annotated[Path, typer.Option(
        "--output", help="Root of suite folders: <output>/<suite name>/cells/<cell>/. "
        "Example: --output /scratch/sweeps")
    ] = Path("checkpoints/sweeps"),
    device: DeviceOption = "auto",
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
    from hssl_cli.sweep.report import as_json as report_json
    from hssl_cli.sweep.report import (
        collect,
        markdown,
        plot,
        plot_curve,
        protocol_line,
        rich_claims_table,
        rich_table,
        write_csv,
    )
    from hssl_cli.sweep.suite import load_suite

    loaded = load_suite(suite_path, overrides or [])
    cells = loaded.cells
    if cell is not None:
        if not 0 <= cell < len(cells):
            raise HsslError(f"--cell {cell}: {suite_path} has cells 0 to {len(cells) - 1} (see --list)")
        cells = [cells[cell]]
    if list_cells:
        _print_cells(loaded, cells, output_dir, as_json)
        return
    if not report_only:
        _run_cells(loaded, cells, output_dir, device)
        if cell is not None:
            return
    report = collect(loaded, output_dir)
    folder = output_dir / loaded.name
    command = " ".join(["hssl sweep", str(suite_path), *(f"--set {o}" for o in overrides or [])])
    write_text_atomically(folder / "report.md", markdown(report, command))
    write_csv(report, folder / "report.csv")
    written = ["report.md", "report.csv"]
    curve_missing = None
    if report.results:
        plot(report, folder / "report.png")
        written.append("report.png")
        if loaded.suite.report.curve:
            if plot_curve(report, loaded.suite.report.curve, folder / "report-curve.png"):
                written.append("report-curve.png")
            else:
                curve_missing = loaded.suite.report.curve
    if as_json:
        output.print_json(json.dumps(report_json(report)))
        return
    output.print(rich_table(report))
    output.print(protocol_line(report), soft_wrap=True, highlight=False, markup=False)
    claims = rich_claims_table(report)
    if claims is not None:
        output.print(claims)
    output.print(f"{len(report.results)} of {len(loaded.cells)} cells done, {report.cell_seconds / 60:.1f} min of "
                 f"cell time; written: {folder}/{', '.join(written)}", soft_wrap=True, highlight=False, markup=False)
    if curve_missing:
        output.print(f"report.curve {curve_missing}: no finished cell logged it against epoch (train.monitor on, "
                     "and the name as in the cells' metrics?); no curve drawn", soft_wrap=True, highlight=False,
                     markup=False)


def _run_cells(loaded, cells: list, output_dir: Path, device: str) -> None:
    from hssl_cli.evaluate.spectrum import training_diagnostics
    from hssl_cli.sweep.run import run_cell

    for number, one in enumerate(cells, start=1):
        prefix = f"[{number}/{len(cells)}] cell {one.index} {one.id}"

        def status(text: str, prefix: str = prefix) -> None:
            console.print(f"{prefix}: {text}", highlight=False, soft_wrap=True, markup=False)

        with TrainingProgress(console, prefix) as progress:
            result = run_cell(loaded, one, output_dir, device, progress=progress.update,
                              diagnostics=training_diagnostics, status=status)
        if result is not None and result["status"] == "interrupted":
            status("interrupted: run the same command again to continue this cell")
            raise typer.Exit(143)


def _print_cells(loaded, cells: list, output_dir: Path, as_json: bool) -> None:
    from hssl_cli.sweep.run import cell_folder, read_result

    rows = []
    for one in cells:
        folder = cell_folder(output_dir, loaded, one)
        result = read_result(folder, loaded, one)
        state = result["status"] if result is not None else "started" if folder.exists() else "pending"
        rows.append({"index": one.index, "cell": one.id, "status": state, "folder": str(folder),
                     "overrides": one.overrides})
    if as_json:
        output.print_json(json.dumps(rows))
        return
    print_cells(output, rows, f"{loaded.path}: {len(loaded.cells)} cells")


def main() -> None:
    app()
