"""`hssl collapse-report`: the spectra of a checkpoint's layers on a data sample, a verdict per layer,
the predictor alignment and an optional PNG. The CLI only renders the dict returned here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from hssl_cli.errors import HsslError
from hssl_cli.evaluate.measures.collapse_verdict import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    import torch

    from hssl_cli.evaluate.opening import TrainedMethod

CHUNK = 512  # images per forward pass, at most (fewer where the memory budget asks: forward_memory)


def collapse_report(path: Path, dataset: str | None = None, data_root: str | None = None, split: str | None = None,
                    samples: int = 2048, threshold: float = DEFAULT_THRESHOLD,
                    device_name: str = "auto", progress: bool = True, verify: bool = True) -> dict:
    """Spectral collapse metrics of every layer (backbone, projector, predictor) of a checkpoint on
    `samples` images of `split` (default: the data's test split), drawn with a fixed seed. The eigenvalues
are in the report; plot_spectra draws one or several reports."""
    from hssl_cli.engine.device import resolve_device
    from hssl_cli.evaluate.measures.spectrum import layer_spectrum, predictor_alignment
    from hssl_cli.evaluate.opening import open_for_evaluation
    from hssl_cli.evaluate.subsets import fixed_sample
    from hssl_cli.render import progress_bars

    if samples < 2:
        raise HsslError(f"--samples {samples}: need at least 2 images for a covariance")
    if not 0 < threshold < 1:
        raise HsslError(f"--threshold {threshold}: a fraction of the largest eigenvalue, between 0 and 1 (e.g. 1e-3)")
    started = time.perf_counter()
    opened = open_for_evaluation(path, resolve_device(device_name), dataset, data_root, verify)
    split = split or opened.data.test_split
    images = opened.read_split(split, progress_bars(progress)).images
    chosen = fixed_sample(len(images), samples)
    outputs = _layer_outputs(opened.trained, images, chosen)
    layers = {name: layer_spectrum(embeddings, threshold) for name, embeddings in outputs.items()}
    alignment = predictor_alignment(outputs["projector"], outputs["predictor"]) if "predictor" in outputs else None
    # the verdict of the representation the loss shapes: the projector output when there is one
    verdict_layer = "projector" if "projector" in layers else "backbone"
    return {
        "checkpoint": opened.source,
        "method": opened.recipe.method.name,
        "loss": opened.recipe.method.loss_variant,  # e.g. DirectPred's byol | iso
        "backbone": opened.recipe.model.backbone,
        "epoch": opened.checkpoint.epoch,
        "dataset": opened.data.dataset,
        "data_root": opened.data.root,
        "split": split,
        "samples": len(chosen),
        "threshold": threshold,
        "verdict": layers[verdict_layer]["verdict"],
        "verdict_layer": verdict_layer,
        "layers": layers,
        "predictor_alignment": alignment,
        "plot": None,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _layer_outputs(trained: TrainedMethod, images: torch.Tensor, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's outputs (spectrum.layer_outputs) on the chosen images, CHUNK images per forward pass at most."""
    import torch

    from hssl_cli.data.augment import normalize
    from hssl_cli.evaluate.forward_memory import images_per_pass
    from hssl_cli.evaluate.measures.spectrum import layer_outputs

    device = trained.mean.device

    def forward(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return layer_outputs(trained.method, normalize(batch.to(device), trained.mean, trained.std))

    chunks: dict[str, list] = {}
    with torch.no_grad():
        per_pass = images_per_pass(forward, tuple(images.shape[1:]), device, CHUNK)
        for start in range(0, len(chosen), per_pass):
            for name, output in forward(images[chosen[start:start + per_pass]]).items():
                chunks.setdefault(name, []).append(output.cpu())
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def collapse_reports(paths: list[Path], dataset: str | None = None, data_root: str | None = None,
                     split: str | None = None, samples: int = 2048, threshold: float = DEFAULT_THRESHOLD,
                     device_name: str = "auto", progress: bool = True, verify: bool = True, plot: Path | None = None,
                     labels: list[str] | None = None, shared_axes: bool = True) -> list[dict]:
    """`hssl collapse-report`: a report per checkpoint, on the same data sample; with `plot`, one figure of
    their spectra overlaid (`labels`: one per checkpoint), which every report names."""
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise HsslError(f"--plot {plot}: give a .png, .pdf or .svg file")
    if labels and len(labels) != len(paths):
        raise HsslError(f"--label given {len(labels)} time(s) for {len(paths)} checkpoint(s); give one each or none")
    reports = [collapse_report(path, dataset=dataset, data_root=data_root, split=split, samples=samples,
                               threshold=threshold, device_name=device_name, progress=progress, verify=verify)
               for path in paths]
    if plot is not None:
        plot_spectra(reports, plot, labels, shared_axes)
        for report in reports:
            report["plot"] = str(plot)
    return reports


def plot_spectra(reports: list[dict], path: Path, labels: list[str] | None = None, shared_axes: bool = True) -> None:
    """Correlation spectra of one or several collapse reports, overlaid: one log-scale panel per layer
    (eigenvalue / the largest, by rank), a line per checkpoint with its effective rank in the legend, the
    threshold dashed; panels share their y-axis unless `shared_axes` is False. The format follows the
    path's suffix (PNG, PDF, SVG)."""
    import torch
    from matplotlib.figure import Figure  # lazily: plotting is optional; Figure needs no pyplot state

    from hssl_cli.files import save_figure_atomically
    from hssl_cli.render import dataset_label, report_label

    labels = labels or [report_label(report) for report in reports]
    layer_names = list(dict.fromkeys(name for report in reports for name in report["layers"]))
    figure = Figure(figsize=(3.6 * len(layer_names) + 0.4, 3.4), layout="constrained")
    axes = figure.subplots(1, len(layer_names), squeeze=False, sharey=shared_axes)[0]
    floor = 1e-12  # zeros cannot be drawn on a log axis; they sit on the floor
    lowest = min(report["threshold"] for report in reports)
    for axis, name in zip(axes, layer_names, strict=True):
        dims = []
        for index, (report, label) in enumerate(zip(reports, labels, strict=True)):
            layer = report["layers"].get(name)
            if layer is None:
                continue
            dims.append(layer["dim"])
            eigenvalues = torch.tensor(layer["eigenvalues"], dtype=torch.float64)
            largest = eigenvalues.max()
            relative = (eigenvalues / largest).clamp_min(floor) if largest > 0 else torch.full_like(eigenvalues, floor)
            lowest = min(lowest, float(relative.min()))
            axis.semilogy(range(1, len(relative) + 1), relative.numpy(), color=f"C{index % 10}", linewidth=1.3,
                          label=f"{label} (eff. rank {layer['effective_rank']:.1f})")
        axis.axhline(reports[0]["threshold"], color="0.4", linestyle="--", linewidth=0.8,
                     label=f"threshold {reports[0]['threshold']:g}")
        axis.set_title(f"{name} (D={'/'.join(map(str, dict.fromkeys(dims)))})", fontsize=10)
        axis.set_xlabel("eigenvalue rank")
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(loc="lower left", fontsize=7)
        if not shared_axes or axis is axes[0]:
            axis.set_ylabel("eigenvalue / largest")
    for axis in axes:
        axis.set_ylim(lowest / 3, 3)
    figure.suptitle(f"Correlation spectra: {dataset_label(reports[0])}, {reports[0]['samples']} "
                    f"{reports[0]['split']} images", fontsize=11)
    save_figure_atomically(figure, path)
