"""The `hssl` command line. Each command parses its options, calls one engine function and renders
the result with rich. Heavy libraries (torch, escnn) are imported inside the commands that need them,
so `--help` and a bad recipe answer in a fraction of a second."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hssl_cli import __version__
from hssl_cli.errors import HsslError

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


def user_errors(command):
    """Turn an HsslError into one red line and exit code 2; bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HsslError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        output.print(f"hssl {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Equivariant and homomorphic self-supervised learning on images."""


class TrainingProgress:
    """A rich progress bar fed by the engine's log rows; plain lines when stderr is not a terminal."""

    def __init__(self, console: Console, title: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console, self.title, self.task = console, title, None
        self.last_epoch_printed = 0
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console,
                            disable=not console.is_terminal)

    def __enter__(self) -> TrainingProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, row: dict) -> None:
        epoch = int(row["step"] // row["steps_per_epoch"])
        stats = (f"epoch {row['epoch']:.2f}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
                 f"{row['images_per_second']:.0f} img/s")
        if self.task is None:
            self.task = self.bar.add_task(self.title, total=row["total_steps"], stats=stats)
        self.bar.update(self.task, completed=row["step"], stats=stats)
        if not self.console.is_terminal and epoch > self.last_epoch_printed:
            self.last_epoch_printed = epoch
            self.console.print(f"{self.title}: step {row['step']}/{row['total_steps']}  {stats}", highlight=False,
                               soft_wrap=True)


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
        "complete run of this recipe under --output). The recipe must match the run's. Example: --resume auto")
    ] = None,
    device: DeviceOption = "auto",
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
    from hssl_cli.engine.train import pretrain as run_pretrain

    with TrainingProgress(console, f"pretrain {recipe.name}") as progress:
        result = run_pretrain(recipe, output_dir, device_name=device, resume=resume, progress=progress.update)
    suffix = " (interrupted: continue with --resume)" if result.interrupted else ""
    table = Table(title=f"pretrain {recipe.name}{suffix}")
    for column in ("epochs", "steps", "final loss", "wall time", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(str(result.epochs), str(result.steps), f"{result.final_loss:.4f}", f"{result.wall_seconds:.1f} s",
                  f"{result.images_per_second:.0f}")
    output.print(table)
    output.print(f"checkpoint: {result.checkpoint}\nevaluate it: hssl probe {result.checkpoint}", soft_wrap=True,
                 highlight=False)
    if result.interrupted:
        raise typer.Exit(143)


@app.command()
@user_errors
def probe(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CKPT", help="A model checkpoint or run folder. Example: checkpoints/quickstart/<run>/last.safetensors",
        show_default=False)],
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="Probe on another dataset than the checkpoint's (digits, mnist, cifar10, stl10, "
        "imagefolder). Example: --dataset cifar10 --data-root ~/data/cifar10")] = None,
    data_root: Annotated[str | None, typer.Option(
        "--data-root", help="Folder of the dataset files (default: the checkpoint's data.root).")] = None,
    features: Annotated[str, typer.Option(
        "--features", help="backbone (f(x), the usual choice) or projector (g(f(x))).")] = "backbone",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Linear and kNN evaluation of the frozen features of a checkpoint (no recipe file needed).

    Features of the train and test splits are extracted once. A softmax classifier is trained \
full-batch (L-BFGS) on standardised features, its weight decay chosen on a held-out 10% of train; \
a weighted kNN (cosine, k=20 and k=200, temperature 0.07) votes. Top-1/top-5 on the test split.

    Example: hssl probe checkpoints/quickstart/20261123-120000/last.safetensors --json
    """
    from hssl_cli.evaluate.probe_checkpoint import probe_checkpoint

    report = probe_checkpoint(checkpoint, dataset=dataset, data_root=data_root, features=features,
                              device_name=device, progress=not as_json)
    if as_json:
        output.print_json(json.dumps(report))
        return
    table = Table(title=f"probe: {report['dataset']} {report['train_size']} train / {report['test_size']} test, "
                  f"{report['features']} features (d={report['feature_dim']})")
    for column in ("evaluation", "top-1 %", "top-5 %", "detail"):
        table.add_column(column)
    for name, result in report["results"].items():
        table.add_row(name, f"{result['top1']:.2f}", f"{result['top5']:.2f}", result.get("detail", ""))
    output.print(table)
    output.print(f"checkpoint: {report['checkpoint']} (epoch {report['epoch']}, {report['method']}, "
                 f"{report['backbone']}); {report['seconds']:.1f} s", soft_wrap=True, highlight=False)


def main() -> None:
    app()
