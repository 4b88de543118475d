"""`hssl collapse-report`: the spectra of a checkpoint's layers on a data sample, a verdict per layer,
the predictor alignment and an optional PNG. The CLI only renders the dict returned here."""

from __future__ import annotations

import time
from pathlib import Path

from hssl_cli.errors import HsslError
from hssl_cli.evaluate.verdict import DEFAULT_THRESHOLD

CHUNK = 512  # images per forward pass


def collapse_report(path: Path, dataset: str | None = None, data_root: str | None = None, split: str | None = None,
                    samples: int = 2048, threshold: float = DEFAULT_THRESHOLD,
                    device_name: str = "auto", progress: bool = True, verify: bool = True) -> dict:
    """Spectral collapse metrics of every layer (backbone, projector, predictor) of a checkpoint on
    `samples` images of `split` (default: the data's test split), drawn with a fixed seed. The eigenvalues
are in the report; spectrum.plot_spectra draws one or several reports."""
    import torch

    from hssl_cli.data.augment import normalize
    from hssl_cli.data.sources import load_split
    from hssl_cli.engine.checkpoint import load_checkpoint
    from hssl_cli.engine.device import resolve_device
    from hssl_cli.evaluate.frozen import load_trained_method
    from hssl_cli.evaluate.probe_checkpoint import evaluation_data
    from hssl_cli.evaluate.spectrum import layer_outputs, layer_spectrum, predictor_alignment
    from hssl_cli.render import progress_bars

    if samples < 2:
        raise HsslError(f"--samples {samples}: need at least 2 images for a covariance")
    if not 0 < threshold < 1:
        raise HsslError(f"--threshold {threshold}: a fraction of the largest eigenvalue, between 0 and 1 (e.g. 1e-3)")
    started = time.perf_counter()
    device = resolve_device(device_name)
    checkpoint = load_checkpoint(path, verify=verify)
    data_config = evaluation_data(checkpoint.recipe.data, dataset, data_root)
    split = split or data_config.test_split
    trained = load_trained_method(checkpoint, device)
    method, mean, std = trained.method, trained.mean, trained.std

    images = load_split(data_config, split, progress=progress_bars(progress)).images
    if images.shape[1] != mean.numel():
        raise HsslError(f"{data_config.dataset} has {images.shape[1]} channel(s) but the checkpoint's model reads "
                        f"{mean.numel()}; use a dataset with {mean.numel()}")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:samples]
    chunks: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, len(chosen), CHUNK):
            batch = normalize(images[chosen[start:start + CHUNK]].to(device), mean, std)
            for name, output in layer_outputs(method, batch).items():
                chunks.setdefault(name, []).append(output.cpu())
    outputs = {name: torch.cat(parts) for name, parts in chunks.items()}

    layers = {name: layer_spectrum(embeddings, threshold) for name, embeddings in outputs.items()}
    alignment = predictor_alignment(outputs["projector"], outputs["predictor"]) if "predictor" in outputs else None
    # the verdict of the representation the loss shapes: the projector output when there is one
    verdict_layer = "projector" if "projector" in layers else "backbone"
    loss = checkpoint.recipe.method.loss_variant  # e.g. DirectPred's byol | iso
    return {
        "checkpoint": str(checkpoint.path),
        "method": checkpoint.recipe.method.name,
        "loss": loss,
        "backbone": checkpoint.recipe.model.backbone,
        "epoch": checkpoint.epoch,
        "dataset": data_config.dataset,
        "data_root": data_config.root,
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
        from hssl_cli.evaluate.spectrum import plot_spectra

        plot_spectra(reports, plot, labels, shared_axes)
        for report in reports:
            report["plot"] = str(plot)
    return reports
