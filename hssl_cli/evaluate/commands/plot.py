"""`hssl plot`: training curves of one or several runs from their metrics.jsonl, overlaid panel by panel
(loss, learning rate, the online monitor's accuracy, the effective rank of each diagnosed layer)."""

from __future__ import annotations

import fnmatch
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from hssl_cli.errors import CheckpointNote, HsslError
from hssl_cli.files import save_figure_atomically

METRICS_FILE = "metrics.jsonl"
DEFAULT_PANELS = ("loss", "lr", "monitor/*", "diagnostics/*/effective_rank")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
PANEL_TITLES = {"loss": "training loss", "lr": "learning rate"}


@dataclass
class RunCurves:
    folder: Path
    label: str
    series: dict[str, dict[float, float]]  # metric -> {epoch: value}; a resumed run's rewritten steps once


def run_folders(paths: list[Path]) -> list[Path]:
    """Run folders named by `paths`: a run folder, a file in one (a checkpoint), or a folder holding runs
    (checkpoints/quickstart: all its runs, oldest first)."""
    folders: list[Path] = []
    for path in paths:
        if path.is_file():
            path = path.parent
        if (path / METRICS_FILE).is_file():
            folders.append(path)
        elif path.is_dir() and (found := sorted(p.parent for p in path.rglob(METRICS_FILE))):
            folders.extend(found)
        else:
            raise HsslError(f"{path}: no {METRICS_FILE} here or below; give run folders (checkpoints/<name>/<run>) "
                            "or checkpoints in them")
    return list(dict.fromkeys(folders))


def read_runs(paths: list[Path], labels: list[str] | None = None) -> list[RunCurves]:
    """The runs `paths` name (see run_folders), each labelled by `labels` (one per run) or by default."""
    folders = run_folders(paths)
    if labels and len(labels) != len(folders):
        raise HsslError(f"--label given {len(labels)} time(s) for {len(folders)} run(s); give one per run or none")
    return [read_run(folder, label) for folder, label in zip(folders, labels or [None] * len(folders), strict=True)]


def read_run(folder: Path, label: str | None = None) -> RunCurves:
    """The numeric series of a run's metrics.jsonl by epoch. When a resumed run rewrote steps a killed run
    had logged after its last checkpoint, the later rows win; a line cut short by a kill is skipped."""
    series: dict[str, dict[int, tuple[float, float]]] = {}
    skipped = 0
    try:
        lines = (folder / METRICS_FILE).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise HsslError(f"{folder / METRICS_FILE}: cannot read it ({error})") from None
    for line in lines:
        try:
            row = json.loads(line)
            step, epoch = int(row["step"]), float(row["epoch"])
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        for name, value in row.items():
            if name not in ("step", "epoch") and isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(name, {})[step] = (epoch, float(value))
    if skipped:
        warnings.warn(CheckpointNote(f"{folder / METRICS_FILE}: skipped {skipped} unreadable line(s)"), stacklevel=2)
    by_epoch = {name: dict(sorted(points.values())) for name, points in series.items()}
    return RunCurves(folder, label or f"{folder.parent.name}/{folder.name}", by_epoch)


def panel_title(metric: str) -> str:
    """loss -> training loss, monitor/knn_k20_top1 -> monitor: kNN(20) top-1 %, diagnostics/x/y -> x/y."""
    from hssl_cli.render import monitor_label

    if metric.startswith("monitor/"):
        return f"monitor: {monitor_label(metric.removeprefix('monitor/'))} %"
    return PANEL_TITLES.get(metric, metric.removeprefix("diagnostics/"))


def chosen_panels(runs: list[RunCurves], patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Metric names matching the patterns (fnmatch, e.g. monitor/*), in pattern order, present in a run."""
    names = [name for run in runs for name in run.series]
    panels = [name for pattern in patterns for name in sorted(set(names)) if fnmatch.fnmatchcase(name, pattern)]
    return list(dict.fromkeys(panels))


def plot_runs(runs: list[RunCurves], out: Path, patterns: tuple[str, ...] | list[str] = DEFAULT_PANELS,
              title: str | None = None) -> list[str]:
    """One panel per chosen metric against epochs, a line per run (the same colour in every panel); the
    format follows out's suffix (PNG, PDF or SVG). Returns the panels drawn."""
    from matplotlib.figure import Figure

    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise HsslError(f"--out {out}: give a .png, .pdf or .svg file")
    panels = chosen_panels(runs, patterns)
    if not panels:
        available = sorted({name for run in runs for name in run.series})
        raise HsslError(f"no metric of these runs matches {', '.join(patterns)}; they log: {', '.join(available)}")
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.4 * columns, 3.3 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = [f"C{index % 10}" for index in range(len(runs))]
    legend = {}  # run label -> its line, from whichever panel drew it first
    for axis, panel in zip(axes, panels, strict=False):
        for run, colour in zip(runs, colours, strict=True):
            points = run.series.get(panel)
            if points:
                many = len(points) > 30
                (line,) = axis.plot(list(points), list(points.values()), color=colour, label=run.label,
                                    marker=None if many else ".", linewidth=1.2)
                legend.setdefault(run.label, line)
        axis.set_title(panel_title(panel), fontsize=10)
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=0.3)
        if panel == "loss" and all(v > 0 for run in runs for v in run.series.get(panel, {}).values()):
            axis.set_yscale("log")
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(len(runs), 3),
                  fontsize=8)
    figure.suptitle(title or f"training curves: {', '.join(sorted({run.folder.parent.name for run in runs}))}",
                    fontsize=11)
    try:
        save_figure_atomically(figure, out)
    except OSError as error:
        raise HsslError(f"--out {out}: cannot write it ({error.strerror or error})") from None
    return panels
