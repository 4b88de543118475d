"""Rich rendering of the commands' results: progress bars, tables and summary lines. The commands in
cli.py compute; these functions only print what they are given."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hssl_cli.errors import CheckpointNote

if TYPE_CHECKING:
    import hssl_cli.progress


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on stderr for long work (decoding, feature extraction); yields `advance(count)`."""
    if not enabled:
        yield lambda count: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda count: bar.advance(task, count)


def progress_bars(enabled: bool) -> hssl_cli.progress.Progress:
    """The Progress that data's loaders are handed (hssl_cli/progress.py): a progress_bar per piece of work."""
    return functools.partial(progress_bar, enabled)


@contextlib.contextmanager
def notes_as_lines(console: Console) -> Iterator[None]:
    """While one command runs: a CheckpointNote warning is one 'note: ...' line on `console`; any other
    warning shows as it did before the command, and the previous display is back afterwards."""
    show_other = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, CheckpointNote):
            console.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            show_other(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = show_other


class TrainingProgress:
    """A rich progress bar fed by the engine's log rows; plain lines when stderr is not a terminal."""

    def __init__(self, console: Console, title: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console, self.title, self.task = console, title, None
        self.last_epoch_printed = 0
        self.monitor = ""  # the online monitor's last values, shown with every row
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console,
                            disable=not console.is_terminal)

    def __enter__(self) -> TrainingProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def update(self, row: dict) -> None:
        if "message" in row:  # a line from the engine before training (e.g. which data storage it chose)
            self.console.print(f"{self.title}: {row['message']}", highlight=False, soft_wrap=True)
            return
        epoch = int(row["step"] // row["steps_per_epoch"])
        monitored = {key.removeprefix("monitor/"): value for key, value in row.items() if key.startswith("monitor/")}
        if monitored:
            self.monitor = "  " + "  ".join(f"{monitor_label(key)} {value:.1f}" for key, value in monitored.items())
        stats = (f"epoch {row['epoch']:.2f}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
                 f"{row['images_per_second']:.0f} img/s{self.monitor}")
        if self.task is None:
            self.task = self.bar.add_task(self.title, total=row["total_steps"], stats=stats)
        self.bar.update(self.task, completed=row["step"], stats=stats)
        if not self.console.is_terminal and (epoch > self.last_epoch_printed or monitored):
            self.last_epoch_printed = epoch
            self.console.print(f"{self.title}: step {row['step']}/{row['total_steps']}  {stats}", highlight=False,
                               soft_wrap=True)


def monitor_label(key: str) -> str:
    """knn_k20_top1 -> kNN(20) top-1, linear_top1 -> linear top-1."""
    return key.replace("knn_k", "kNN(").replace("_top1", ") top-1" if key.startswith("knn") else " top-1")


def print_pretrain(output: Console, name: str, result) -> None:
    """The summary of a finished (or interrupted) `hssl pretrain` (an engine RunResult)."""
    suffix = " (interrupted: continue with --resume)" if result.interrupted else ""
    table = Table(title=f"pretrain {name}{suffix}")
    monitored = result.monitor
    for column in ("epochs", "steps", "final loss", "wall time", "images/s",
                   *(monitor_label(key.removeprefix("monitor/")) for key in monitored)):
        table.add_column(column, justify="right")
    final_loss = f"{result.final_loss:.4f}" if result.steps else "untrained"
    table.add_row(str(result.epochs), str(result.steps), final_loss, f"{result.wall_seconds:.1f} s",
                  f"{result.images_per_second:.0f}", *(f"{value:.1f}" for value in monitored.values()))
    output.print(table)
    output.print(f"checkpoint: {result.checkpoint}\nevaluate it: hssl probe {result.checkpoint}", soft_wrap=True,
                 highlight=False, markup=False)


def print_probe(output: Console, report: dict) -> None:
    labels = "" if report.get("labels", "100%") == "100%" else f" ({report['labels']} of the labels)"
    table = Table(title=f"probe: {report['dataset']} {report['train_size']} train{labels} / {report['test_size']} "
                  f"{escape(report['test_split'])}, "
                  f"{report['features']} features (d={report['feature_dim']})")
    for column in ("evaluation", "protocol", "top-1 %", "top-5 %", "detail"):
        table.add_column(column)
    for name, result in report["results"].items():
        table.add_row(name, result.get("protocol", ""), f"{result['top1']:.2f}", f"{result['top5']:.2f}",
                      result.get("detail", ""))
    output.print(table)
    output.print(f"checkpoint: {report['checkpoint']} (epoch {report['epoch']}, {report['method']}, "
                 f"{report['backbone']}); {report['seconds']:.1f} s{cached(report)}", soft_wrap=True, highlight=False,
                 markup=False)
    if report.get("note"):
        output.print(report["note"], soft_wrap=True, highlight=False, markup=False)


def print_export(output: Console, report: dict) -> None:
    output.print(f"wrote {report['out']}: {report['tensors']} tensors of a {report['architecture']} backbone "
                 f"({report['feature_dim']} features); build it with: {report['build']}", soft_wrap=True,
                 highlight=False, markup=False)


def print_augmentation_probe(output: Console, report: dict) -> None:
    table = Table(title=f"augmentation parameters from {report['features']}: R² on {report['scored_images']} "
                  f"held-out train images (ridge {report['ridge']:g}, fitted on {report['fit_images']})")
    table.add_column("parameters")
    table.add_column("R²", justify="right")
    table.add_row("all varying (mean)", f"{report['r2']:.3f}")
    for group, value in report["r2_by_group"].items():
        table.add_row(group, f"{value:.3f}")
    output.print(table)
    output.print(f"checkpoint: {report['checkpoint']} ({report['method']}, {report['view']}); "
                 f"{report['seconds']:.1f} s; 0: the features ignore the augmentation (invariant), 1: they determine "
                 "it", soft_wrap=True, highlight=False, markup=False)


def cached(report: dict) -> str:
    """' (features 1.2 s from the cache, linear 40.1 s, kNN 9.8 s)': where the time went."""
    stages = report.get("seconds_by_stage")
    if not stages:
        return ""
    cache = report.get("feature_cache") or {}
    source = " from the cache" if cache.get("hits") and not cache.get("misses") else ""
    names = {"knn": "kNN", "finetune": "fine-tuning"}
    return " (" + ", ".join(f"{names.get(stage, stage)} {seconds:.1f} s{source if stage == 'features' else ''}"
                            for stage, seconds in stages.items()) + ")"


def dataset_label(report: dict) -> str:
    """CIFAR-10, MNIST, ... or, for an image folder, the folder's name (e.g. cifar10-jpeg)."""
    names = {"digits": "digits (scikit-learn)", "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
             "cifar100_coarse": "CIFAR-100 (20 superclasses)", "stl10": "STL-10"}
    if report["dataset"] == "imagefolder" and report.get("data_root"):
        return Path(report["data_root"]).name
    return names.get(report["dataset"], report["dataset"])


def report_label(report: dict) -> str:
    """'simclr, resnet18_cifar, epoch 200' (with DirectPred's loss where it has one)."""
    loss = f" ({report['loss']} loss)" if report.get("loss") else ""
    return f"{report['method']}{loss}, {report['backbone']}, epoch {report['epoch']}"


def print_collapse(output: Console, report: dict) -> None:
    table = Table(title=f"collapse report: {report['samples']} {escape(dataset_label(report))}/"
                  f"{escape(report['split'])} images, "
                  f"threshold {report['threshold']:g}")
    for column in ("layer", "D", "eff. rank", "raw eff. rank", "RankMe", "part. ratio", "std(z/|z|) / healthy",
                   "collapsed dims", "verdict"):
        table.add_column(column, justify="left" if column in ("layer", "verdict") else "right")
    colours = {"healthy": "green", "dimensional collapse": "yellow", "complete collapse": "bold red"}
    for name, layer in report["layers"].items():
        table.add_row(name, str(layer["dim"]), f"{layer['effective_rank']:.1f}", f"{layer['effective_rank_raw']:.1f}",
                      f"{layer['rankme']:.1f}",
                      f"{layer['participation_ratio']:.1f}",
                      f"{layer['normalized_std']:.4f} / {layer['healthy_std']:.4f}",
                      f"{layer['collapsed_dims']} of {layer['available_dims']}",
                      f"[{colours[layer['verdict']]}]{layer['verdict']}[/]")
    output.print(table)
    alignment = report["predictor_alignment"]
    if alignment is not None:
        output.print(f"predictor alignment with the correlation's eigenvectors: {alignment['alignment']:.3f} "
                     f"(linear fit of the predictor: R^2 {alignment['linear_fit_r2']:.3f})", highlight=False)
    output.print(f"verdict ({report['verdict_layer']}): {report['verdict']}", highlight=False)
    if report["plot"]:
        output.print(f"plot: {report['plot']}", soft_wrap=True, highlight=False, markup=False)
    loss = f" ({report['loss']} loss)" if report["loss"] else ""
    output.print(f"checkpoint: {report['checkpoint']} (epoch {report['epoch']}, {report['method']}{loss}, "
                 f"{report['backbone']}); {report['seconds']:.1f} s", soft_wrap=True, highlight=False, markup=False)


def print_cells(output: Console, rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("cell", "id", "status", "overrides"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["index"]), row["cell"], row["status"], escape(" ".join(row["overrides"])))
    output.print(table)


def sweep_table(suite_name: str, header: list[str], rows: list[list[str]]) -> Table:
    """A suite's report: mean ± std over seeds per variant. Labels and metric names are the suite's text,
    printed literally (not as markup)."""
    table = Table(title=f"sweep {escape(suite_name)}: mean ± std over seeds")
    for number, column in enumerate(header):
        table.add_column(escape(column), justify="left" if number == 0 else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def claims_table(header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title="claims: seed-paired a - b, 95% t interval, verdict by a fixed rule")
    for number, column in enumerate(header):
        table.add_column(escape(column), justify="right" if number in (2, 3) else "left")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def print_sweep_report(output: Console, suite_name: str, written) -> None:
    """The report `hssl sweep` wrote (a sweep.execute.WrittenReport): its table, protocol, claims and files."""
    output.print(sweep_table(suite_name, *written.table))
    output.print(written.protocol, soft_wrap=True, highlight=False, markup=False)
    if written.claims is not None:
        output.print(claims_table(*written.claims))
    output.print(f"{written.finished} of {written.cells} cells done, {written.cell_seconds / 60:.1f} min of cell "
                 f"time; written: {written.folder}/{', '.join(written.files)}", soft_wrap=True, highlight=False,
                 markup=False)
    if written.curve_missing:
        output.print(f"report.curve {written.curve_missing}: no finished cell logged it against epoch (train.monitor "
                     "on, and the name as in the cells' metrics?); no curve drawn", soft_wrap=True, highlight=False,
                     markup=False)


def print_shards(output: Console, folder: Path, out: Path, manifest: dict, manifest_path: Path,
                 size: int | None) -> None:
    """What `hssl shards` packed: per split its images, classes, shards and megabytes."""
    table = Table(title=f"{folder} -> {out}")
    for column in ("split", "images", "classes", "shards", "MB"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in manifest["splits"].items():
        megabytes = sum(shard["bytes"] for shard in split["shards"]) / 2**20
        table.add_row(name, str(split["count"]), str(len(split["classes"]) or "unlabeled"),
                      str(len(split["shards"])), f"{megabytes:.1f}")
    output.print(table)
    output.print(f"wrote {manifest_path}" + (f"; images resized to {size} px, stored as PNG" if size else ""),
                 soft_wrap=True, highlight=False, markup=False)


def _error_cell(error: float | None, gated: bool, tolerance: float) -> str:
    """A gated error green or red against the tolerance, a measured one dim."""
    if error is None:
        return "[dim]-[/]"
    colour = ("green" if error <= tolerance else "red") if gated else "dim"
    return f"[{colour}]{error:.1e}[/]"


def _gate_cell(row: dict) -> str:
    return escape(row["why"]) if row["gated"] else f"[dim]{escape(row['why'])}[/]"


def _group_table(title: str, rows: list[dict], tolerance: float, augmentations: bool = False) -> Table:
    """Rows: layers or feature kinds; columns: the worst gated and the worst measured error with its element
    (every element's value is in --json), the augmentations' error (measured) and why the row is gated or not."""
    table = Table(title=title)
    for column in ("", "max, gated g", "at g", "max, measured g", "at g"):
        table.add_column(column, justify="left" if column == "" else "right")
    if augmentations:
        table.add_column("augmentations", justify="right")
    table.add_column("gate")
    for row in rows:
        cells = [row["name"]]
        for gated in (True, False):
            chosen = {label: error for label, error in row["errors"].items()
                      if (label in row["gated_elements"]) == gated and error is not None}
            label = max(chosen, key=chosen.get, default=None)
            cells += ["-", "-"] if label is None else [_error_cell(chosen[label], gated, tolerance), label]
        if augmentations:
            cells.append(f"[dim]{row['augmentation']:.3f}[/]")
        table.add_row(*cells, _gate_cell(row))
    return table


def _scale_table(scales: dict, tolerance: float) -> Table:
    """Rows: the stages of the lifted network; a column per down-scaling S^j (exact ones gated for a lifting)."""
    table = Table(title=f"scale |f_k(S^j x) - f_(k+j)(x)| / |f_(k+j)(x)|: {scales['levels']} levels, factor "
                  f"{scales['factor']}, levels k < K - j")
    table.add_column("layer")
    for element in scales["elements"]:
        table.add_column(element["label"] + ("" if element["exact"] else ", interpolated"), justify="right")
    table.add_column("gate")
    for row in scales["layers"]:
        cells = [row["name"]]
        for element in scales["elements"]:
            error = row["errors"][element["label"]]
            cells.append("[dim]sizes differ[/]" if error is None else
                         _error_cell(error, element["label"] in row["gated_elements"], tolerance))
        table.add_row(*cells, _gate_cell(row))
    return table


def _translation_table(translations: dict, tolerance: float) -> Table:
    """Rows: shifts of the input; the error of the last map against the map shifted by shift / stride cells."""
    reduced = f"; {translations['reduced']}" if translations["reduced"] else ""
    where = (f"token grid {translations['grid'][0]} x {translations['grid'][1]}, patch {translations['stride']} px, "
             "shifted cyclically" if translations["cyclic"] else
             f"last map, stride {translations['stride']}, {translations['positions']} positions out of the canvas "
             f"border's reach ({translations['canvas']} px canvas){reduced}")
    shifts = Table(title=f"translation |map(T_s x) - S map(x)| / |map(x)|: {where}")
    for column in ("shift", "moves the map by", "error", "gate"):
        shifts.add_column(column, justify="right" if column in ("moves the map by", "error") else "left")
    for shift in translations["shifts"]:
        dy, dx = shift["pixels"]
        cells = f"({dy / translations['stride']:g}, {dx / translations['stride']:g}) cells"
        shifts.add_row(shift["label"], cells + ("" if shift["exact"] else " (interpolated)"),
                       _error_cell(shift["error"], shift["gated"], tolerance), _gate_cell(shift))
    return shifts


def print_equivariance(output: Console, report: dict) -> None:
    """The tables of `hssl equivariance-check` (rotations/flips, translations, scales) and its verdict."""
    tolerance = report["tolerance"]
    if report["layers"]:
        output.print(_group_table(f"equivariance |f(T_g x) - L_g f(x)| / |f(x)|: {report['model_group']} "
                                  f"backbone, test group {report['test_group']}", report["layers"], tolerance))
    output.print(_group_table(f"invariance |f(T_g x) - f(x)| / |f(x)|: test group {report['test_group']}",
                              report["invariance"], tolerance, augmentations=True))
    translations = report["translations"]
    if translations is not None and "skipped" in translations:
        output.print(f"translation check skipped: {translations['skipped']}", soft_wrap=True, markup=False)
    elif translations is not None:
        output.print(_translation_table(translations, tolerance))
    if report["scales"] is not None:
        output.print(_scale_table(report["scales"], tolerance))
    worst = report["worst_gated_error"]
    verdict = "[green]passed[/]" if report["passed"] else "[bold red]failed[/]"
    summary = ("nothing gated: the backbone promises nothing this check measures" if worst is None else
               f"worst of {report['gated_errors']} gated errors {worst:.2e} (tolerance {tolerance:g})")
    reduced = f" ({report['samples_reduced']})" if report.get("samples_reduced") else ""
    output.print(f"{verdict}: {summary}; measured rows are shown, never failing; {report['samples']} "
                 f"{report['dataset']} images{reduced}; {escape(str(report['source']))} ({report['method']}, "
                 f"{report['backbone']}{'' if report['trained'] else ', untrained'}); {report['seconds']:.1f} s",
                 soft_wrap=True)
