"""Aggregate whatever cells of a suite have finished: mean ± std over seeds per variant (and swept
value), as rows for a rich table, Markdown, CSV and a PNG. Imports no torch."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hssl_cli.sweep.claims import ClaimResult, evaluate_claim
from hssl_cli.sweep.provenance import describe_commits
from hssl_cli.sweep.run import cell_folder, read_result
from hssl_cli.sweep.suite import LoadedSuite, ProbeSettings


@dataclass
class Group:
    """The cells of one variant (at one swept value) over the seeds."""

    variant: str
    label: str
    value: Any
    cells: int  # cells the suite defines for this group
    finished: int = 0
    diverged: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per finished seed
    seconds: float = 0.0

    def mean_std(self, metric: str) -> tuple[float, float, int]:
        """(mean, sample std (0 for one seed), n) of a metric; nan mean when no seed has it."""
        numbers = [v for v in self.values.get(metric, []) if v is not None and math.isfinite(v)]
        if not numbers:
            return math.nan, math.nan, 0
        spread = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
        return statistics.fmean(numbers), spread, len(numbers)


@dataclass
class Report:
    loaded: LoadedSuite
    groups: list[Group]
    results: list[dict]  # every finished (or diverged) cell's result
    claims: list[ClaimResult] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        return self.loaded.suite.report.metrics

    @property
    def swept_key(self) -> str | None:
        sweep = self.loaded.suite.sweep
        return sweep.key if sweep is not None else None

    @property
    def cell_seconds(self) -> float:
        return sum(group.seconds for group in self.groups)


def collect(loaded: LoadedSuite, output: Path) -> Report:
    groups: dict[tuple[str, str], Group] = {}
    results = []
    for cell in loaded.cells:
        key = (cell.variant.name, repr(cell.value))
        group = groups.setdefault(key, Group(cell.variant.name, cell.variant.label or cell.variant.name,
                                             cell.value, 0))
        group.cells += 1
        result = read_result(cell_folder(output, loaded, cell), loaded, cell)
        if result is None:
            continue
        results.append(result)
        group.seconds += result.get("seconds", 0.0)
        if result["status"] == "diverged":
            group.diverged += 1
            continue
        group.finished += 1
        for metric in loaded.suite.report.metrics:
            group.values.setdefault(metric, []).append(result["metrics"].get(metric))
    return Report(loaded, list(groups.values()), results, decide_claims(loaded, results))


def decide_claims(loaded: LoadedSuite, results: list[dict]) -> list[ClaimResult]:
    """Every claim of the suite at every value it names (each swept value when it names none)."""
    suite, decided = loaded.suite, []
    labels = {variant.name: variant.label or variant.name for variant in suite.variants}
    for claim in suite.claims:
        values = [claim.value] if claim.value is not None or suite.sweep is None else suite.sweep.values
        for value in values:
            label = claim.label or (f"{labels[claim.a]} > {labels[claim.b]}" if claim.test == "greater"
                                    else f"{labels[claim.a]} ≈ {labels[claim.b]}")
            decided.append(evaluate_claim(claim.a, claim.b, claim.metric, claim.test, claim.margin, value, label,
                                          results, claim.metric_b))
    return decided


def claim_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """One row per decided claim: the claim, the seed-paired differences, their mean and 95% interval, the
    verdict. The rule is hssl_cli/sweep/claims.py's."""
    header = ["claim", "tested as", "a - b per seed", "mean [95% interval]", "verdict"]
    rows = []
    for claim in report.claims:
        digits = 3 if claim.largest < 2 else 2  # a metric on a 0-1 scale (R²) needs a third decimal
        per_seed = ", ".join(f"{difference:+.{digits}f}" for difference in claim.differences) or "-"
        interval = claim.interval
        summary = (f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"
                   if interval is not None else "-")
        rows.append([claim.label, claim.statement, per_seed, summary, claim.outcome])
    return header, rows


def format_value(mean: float, std: float, count: int) -> str:
    if count == 0:
        return "-"
    digits = 2 if abs(mean) < 10 and abs(mean) != 0 else 1
    if abs(mean) < 0.01 and mean != 0:
        return f"{mean:.2e}" + (f" ± {std:.1e}" if count > 1 else "")
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if count > 1 else "")  # no spread from one seed


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the rich table, the Markdown and the CSV-free text outputs."""
    header = ["variant"] + ([report.swept_key] if report.swept_key else []) + ["n"] + report.metrics
    rows = []
    for group in report.groups:
        count = f"{group.finished}/{group.cells}" + (f" ({group.diverged} diverged)" if group.diverged else "")
        row = [group.label] + ([_plain(group.value)] if report.swept_key else []) + [count]
        row += [format_value(*group.mean_std(metric)) for metric in report.metrics]
        rows.append(row)
    return header, rows


def markdown(report: Report, command: str | None = None) -> str:
    suite = report.loaded.suite
    header, rows = table_rows(report)
    lines = [f"**{suite.name}**" + (f": {suite.description.strip()}" if suite.description else ""), ""]
    lines.append(protocol_line(report))
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(f"mean ± sample std over seeds {suite.seeds}; n = finished seeds / cells; "
                 f"{report.cell_seconds / 60:.1f} min of cell time in all.")
    if report.results:
        lines.append(f"Cells made by {describe_commits(report.results)}.")
    if command:
        lines.append(f"Made by: `{command}`")
    if report.claims:
        header, rows = claim_rows(report)
        lines += ["", "Claims (seed-paired differences a - b and their 95% t interval; verdict by the rule of "
                  "`hssl sweep --help`: greater (reversed) when the interval lies above (below) 0, equivalent "
                  "(not equivalent) when it lies inside (outside) ±margin, else not resolved):", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(" --- " for _ in header) + "|")
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def protocol_line(report: Report) -> str:
    probe = report.loaded.suite.probe
    split = "held-out train images (validation)" if probe.validation else "the test split"
    rotations = (f"; @rotN: the test images rotated by N degrees ({', '.join(f'{a:g}' for a in probe.test_rotations)})"
                 if probe.test_rotations else "")
    kernel = ("; knn_kK_exact_kernel = the same vote with the exact base kernel as the similarity"
              if probe.exact_kernel_knn else "")
    if probe.protocol == "finetune":
        return (f"Probe: finetune = {_finetune_protocol(probe)}; top-1 % on {split}, {_probe_sizes(probe)}{rotations}."
                f"{_transfer_text(report)}")
    return (f"Probe: {probe.features} features, frozen; linear = {_linear_protocol(probe)}; knn_kK = cosine kNN, "
            f"T = 0.07{kernel}; top-1 % on {split}, {_probe_sizes(probe)}{rotations}.{_transfer_text(report)}")


def _finetune_protocol(probe: ProbeSettings) -> str:
    optimizer = "SGD (Nesterov 0.9)" if probe.optimizer == "sgd" else "AdamW"
    return (f"the backbone and a zero-initialised linear head trained end to end ({optimizer}, {probe.epochs} epochs, "
            f"batch {probe.batch_size}, head lr {probe.lr:g} x batch/256, backbone lr x {probe.backbone_lr_scale:g}, "
            f"cosine, weight decay {probe.weight_decay:g}, random resized crop and flip), not comparable with the "
            "frozen protocols")


def _linear_protocol(probe: ProbeSettings) -> str:
    """How `linear` is fitted under the probe's protocol (one not described here is named)."""
    if probe.protocol == "fast":
        return ("softmax regression (L-BFGS) on standardised features, weight decay chosen on 10% of the probe's "
                "train images")
    if probe.protocol == "finetune":
        return f"none (finetune = {_finetune_protocol(probe)})"
    if probe.protocol == "standard":
        return (f"the papers' SGD linear evaluation (Nesterov 0.9, {probe.epochs} epochs, batch {probe.batch_size}, "
                f"lr {probe.lr:g} x batch/256, cosine, weight decay {probe.weight_decay:g}, random resized crop and "
                "flip every epoch)")
    return f"protocol {probe.protocol}"


def _probe_sizes(probe: ProbeSettings) -> str:
    labels = "" if probe.labels.strip() == "100%" else f" ({probe.labels.strip()} of each class's labels)"
    return (f"{probe.train_samples or 'all'} train{labels} / {probe.test_samples or 'all'} "
            f"{'held-out' if probe.validation else 'test'} images")


def _transfer_text(report: Report) -> str:
    """The transfer probes, each as the dataset it reads and how it probes it; empty without any."""
    probes = [f"transfer/{probe.key}/* = {probe.dataset}" + (f" ({probe.data_root})" if probe.data_root else "")
              + f", {probe.features} features, linear = {_linear_protocol(probe)}, {_probe_sizes(probe)}"
              + (" (validation)" if probe.validation else "")
              for probe in report.loaded.suite.transfer]
    return f" Transfer probes: {'; '.join(probes)}." if probes else ""


def write_csv(report: Report, path: Path) -> None:
    """One row per finished cell: its coordinates and every metric of the report."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell", "variant", "key", "value", "seed", "status", "seconds", *report.metrics])
    for result in report.results:
        metrics = result.get("metrics", {})
        writer.writerow([result["cell"], result["variant"], result.get("key") or "", _plain(result.get("value")),
                         result["seed"], result["status"], result.get("seconds", ""),
                         *[metrics.get(metric, "") for metric in report.metrics]])
    from hssl_cli.files import write_text_atomically

    write_text_atomically(path, buffer.getvalue())


def plot(report: Report, path: Path) -> None:
    """Bars (mean ± std, seeds as dots) per variant; or, with a swept key, one line per variant against
    its values (log axis when they span a factor of 10 or more)."""
    from matplotlib.figure import Figure

    suite = report.loaded.suite
    metric = suite.report.plot or report.metrics[0]
    figure = Figure(figsize=(max(5.0, 1.1 * len({g.variant for g in report.groups}) + 2.5), 4.0),
                    layout="constrained")
    axis = figure.subplots()
    if report.swept_key is None:
        for position, group in enumerate(report.groups):
            mean, std, count = group.mean_std(metric)
            if count:
                axis.bar(position, mean, yerr=std, capsize=4, color=f"C{position % 10}", alpha=0.75)
                seeds = [v for v in group.values.get(metric, []) if v is not None]
                axis.plot([position] * len(seeds), seeds, "k.", markersize=5)
        axis.set_xticks(range(len(report.groups)), [g.label for g in report.groups], rotation=20, ha="right")
        finite = [v for g in report.groups for v in g.values.get(metric, []) if v is not None and math.isfinite(v)]
        if finite:
            low, high = min(finite), max(finite)
            axis.set_ylim(low - 0.25 * (high - low + 1e-9) - 1e-9, high + 0.15 * (high - low + 1e-9) + 1e-9)
    else:
        variants: dict[str, list[Group]] = {}
        for group in report.groups:
            variants.setdefault(group.label, []).append(group)
        numeric = all(isinstance(g.value, int | float) for g in report.groups)
        for number, (label, groups) in enumerate(variants.items()):
            xs = [g.value if numeric else index for index, g in enumerate(groups)]
            stats = [g.mean_std(metric) for g in groups]
            axis.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                          label=label, color=f"C{number % 10}")
            for x, group in zip(xs, groups, strict=True):
                if group.diverged:
                    axis.annotate(f"{group.diverged} div.", (x, 0), xycoords=("data", "axes fraction"),
                                  color=f"C{number % 10}", fontsize=7, ha="center", va="bottom")
        values = [g.value for g in report.groups]
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            axis.set_xscale("log")
        if not numeric:
            first = next(iter(variants.values()))
            axis.set_xticks(range(len(first)), [_plain(g.value) for g in first])
        axis.set_xlabel(report.swept_key)
        axis.legend(fontsize=8)
    axis.set_ylabel(metric)
    axis.grid(True, alpha=0.3)
    axis.set_title(f"{suite.name}: {metric}, mean ± std over {len(suite.seeds)} seeds", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def curve_points(report: Report, metric: str) -> dict[str, dict[int, list[float]]]:
    """{variant label: {epoch: [one value per finished seed]}} of a metric logged per epoch (`metric@E`)."""
    labels = {variant.name: variant.label or variant.name for variant in report.loaded.suite.variants}
    points: dict[str, dict[int, list[float]]] = {}
    for result in report.results:
        name = labels[result["variant"]] + ("" if result.get("value") is None else f" ({_plain(result['value'])})")
        for key, value in result.get("metrics", {}).items():
            stem, _, epoch = key.rpartition("@")
            if stem == metric and epoch.isdigit() and isinstance(value, int | float) and math.isfinite(value):
                points.setdefault(name, {}).setdefault(int(epoch), []).append(value)
    return points


def plot_curve(report: Report, metric: str, path: Path) -> bool:
    """Mean ± std over seeds of `metric` against epoch, a line per variant; False when no cell logged it."""
    from matplotlib.figure import Figure

    points = curve_points(report, metric)
    if not points:
        return False
    figure = Figure(figsize=(6.5, 4.0), layout="constrained")
    axis = figure.subplots()
    for number, (label, by_epoch) in enumerate(points.items()):
        epochs = sorted(by_epoch)
        means = [statistics.fmean(by_epoch[e]) for e in epochs]
        spreads = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
        color = f"C{number % 10}"
        axis.plot(epochs, means, marker="o", markersize=3, label=label, color=color)
        axis.fill_between(epochs, [m - s for m, s in zip(means, spreads, strict=True)],
                          [m + s for m, s in zip(means, spreads, strict=True)], color=color, alpha=0.15)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title(f"{report.loaded.name}: {metric} against epoch, mean ± std over seeds", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def as_json(report: Report) -> dict:
    groups = []
    for group in report.groups:
        entry = {"variant": group.variant, "label": group.label, "value": group.value, "cells": group.cells,
                 "finished": group.finished, "diverged": group.diverged, "seconds": round(group.seconds, 1),
                 "metrics": {}}
        for metric in report.metrics:
            mean, std, count = group.mean_std(metric)
            entry["metrics"][metric] = {"mean": None if count == 0 else mean, "std": None if count == 0 else std,
                                        "n": count, "values": group.values.get(metric, [])}
        groups.append(entry)
    return {"suite": report.loaded.name, "description": report.loaded.suite.description,
            "key": report.swept_key, "seeds": report.loaded.suite.seeds, "protocol": protocol_line(report),
            "cell_seconds": round(report.cell_seconds, 1), "made_by": describe_commits(report.results),
            "groups": groups, "claims": [claim.as_dict() for claim in report.claims]}


def _plain(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
