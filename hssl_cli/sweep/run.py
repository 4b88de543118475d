"""Run one cell of a suite: pretrain (resuming a killed run), probe, and the optional transfer probes, collapse
report and equivariance check, into the cell's own folder. `result.json`, written atomically last, marks the cell
finished; a finished cell is skipped, a cell whose folder another process holds (a lock) is left to it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from hssl_cli.errors import HsslError, TrainingDiverged
from hssl_cli.files import write_text_atomically
from hssl_cli.recipe import recipe_to_yaml
from hssl_cli.sweep.provenance import provenance
from hssl_cli.sweep.suite import Cell, LoadedSuite, ProbeSettings

RESULT_FILE = "result.json"


def cell_folder(output: Path, loaded: LoadedSuite, cell: Cell) -> Path:
    return output / loaded.name / "cells" / cell.id


def evaluation_settings(loaded: LoadedSuite) -> dict:
    """What a finished cell's numbers depend on besides its recipe."""
    suite = loaded.suite
    settings = {"probe": suite.probe.model_dump(mode="json"),
                "collapse_report": suite.collapse_report.model_dump(mode="json") if suite.collapse_report else None,
                "equivariance_check": suite.equivariance_check}
    if suite.augmentation_probe is not None:  # only when asked: results made before the key existed still match
        settings["augmentation_probe"] = suite.augmentation_probe.model_dump(mode="json")
    if suite.transfer:  # likewise
        settings["transfer"] = [probe.model_dump(mode="json") for probe in suite.transfer]
    return settings


def stored_evaluation(evaluation: dict | None) -> dict | None:
    """A result's evaluation settings as evaluation_settings writes them today: every probe key written out,
    a key the result lacks (added since, or left out by older versions that stored only changed keys) at
    today's default, so adding a key does not orphan finished cells while a changed default does."""
    from pydantic import ValidationError

    from hssl_cli.sweep.suite import ProbeSettings, TransferProbe

    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("probe"), dict):
        return evaluation
    try:
        written = {"probe": ProbeSettings.model_validate(evaluation["probe"]).model_dump(mode="json")}
        if isinstance(evaluation.get("transfer"), list):
            written["transfer"] = [TransferProbe.model_validate(probe).model_dump(mode="json")
                                   for probe in evaluation["transfer"]]
    except ValidationError:
        return evaluation
    return evaluation | written


def read_result(folder: Path, loaded: LoadedSuite, cell: Cell) -> dict | None:
    """The cell's finished result, None when it has none; an error when it was made with other settings
    (a suite edited after cells finished), so old and new numbers never mix in one table."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HsslError(f"{path}: not a readable result (corrupt); delete it and run the cell again") from None
    from hssl_cli.recipe import changed_keys, parse_recipe, resume_safe

    try:
        stored = parse_recipe(result["recipe"], f"{path} (stored recipe)")
    except (KeyError, TypeError):
        raise HsslError(f"{path}: not a result written by hssl sweep; delete it and run the cell again") from None
    changed = [key for key in changed_keys(stored, cell.recipe) if not resume_safe(key)]
    if stored_evaluation(result.get("evaluation")) != evaluation_settings(loaded):
        changed.append("the suite's probe/transfer/collapse_report/equivariance_check/augmentation_probe settings")
    if changed:
        raise HsslError(f"{folder}: finished with other settings than {loaded.path} now gives "
                        f"({', '.join(changed)}); delete the folder to run it again, or use another --output")
    return result


@contextlib.contextmanager
def cell_lock(folder: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on the cell folder: True when this process holds it. Two
    `hssl sweep` processes on one suite thus share its cells out (released when a process dies)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def logged_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_training_row(run_dir: Path) -> dict[str, float]:
    """The last logged row of metrics.jsonl (the losses averaged over its last log_every steps)."""
    losses = [row for row in logged_rows(run_dir) if "loss" in row]
    return losses[-1] if losses else {}


def monitor_curve(run_dir: Path) -> dict[str, float]:
    """The online monitor's values (train.monitor) by epoch: {"monitor/knn_k20_top1@3": ...}; a row logged
    again after a resume replaces the earlier one."""
    curve = {}
    for row in logged_rows(run_dir):
        curve |= {f"{name}@{row['epoch']}": value for name, value in row.items() if name.startswith("monitor/")}
    return curve


def flat_metrics(evaluations: dict[str, dict | None], training: dict) -> dict[str, float]:
    """Every number a report can show, under the names report.metrics uses: of the evaluations (see
    evaluate_checkpoint) and of the last training row."""
    collapse, equivariance = evaluations["collapse_report"], evaluations["equivariance_check"]
    augmentation = evaluations["augmentation_probe"]
    metrics = {name: result["top1"] for name, result in evaluations["probe"]["results"].items()}
    for key, probe in (evaluations["transfer"] or {}).items():
        metrics |= {f"transfer/{key}/{name}": result["top1"] for name, result in probe["results"].items()}
    if augmentation is not None:
        metrics["augmentation/r2"] = augmentation["r2"]
        metrics |= {f"augmentation/r2/{group}": value for group, value in augmentation["r2_by_group"].items()}
    metrics |= {f"train/{name}": value for name, value in training.items()
                if name not in ("step", "epoch", "lr", "images_per_second", "elapsed_seconds")}
    for layer, values in (collapse or {}).get("layers", {}).items():
        metrics |= {f"collapse/{layer}/{key}": value for key, value in values.items()
                    if isinstance(value, int | float) and key != "eigenvalues"}
    if equivariance is not None:
        if equivariance["worst_gated_error"] is not None:
            metrics["equivariance/worst_gated_error"] = equivariance["worst_gated_error"]
        shifts = [row["error"] for row in (equivariance["translations"] or {}).get("shifts", [])
                  if row["exact"] and row["error"] is not None]
        if shifts:  # gated or not: how far whole-cell shifts of the input are from moving the map
            metrics["equivariance/translation"] = max(shifts)
        for row in equivariance["invariance"]:
            metrics[f"equivariance/{row['name'].replace(' ', '_')}_invariance"] = max(row["errors"].values())
    return metrics


def evaluate_checkpoint(loaded: LoadedSuite, checkpoint: Path, device: str, status: Callable[[str], None]
                        ) -> dict[str, dict | None]:
    """The suite's evaluations of a cell's checkpoint: the probe, and the transfer probes ({name: probe}), the
    collapse report, the equivariance check and the augmentation probe where the suite asks for them (None where
    it does not)."""
    status("probe")
    probe = probe_with(loaded.suite.probe, checkpoint, device)
    transfer = None
    if loaded.suite.transfer:
        transfer = {}
        for settings in loaded.suite.transfer:
            status(f"transfer probe {settings.key}")
            transfer[settings.key] = probe_with(settings, checkpoint, device)
    collapse = equivariance = augmentation = None
    if loaded.suite.collapse_report is not None:
        from hssl_cli.evaluate.commands.collapse_report import collapse_report

        status("collapse-report")
        collapse = collapse_report(checkpoint, samples=loaded.suite.collapse_report.samples, device_name=device,
                                   progress=False)
    if loaded.suite.equivariance_check:
        from hssl_cli.evaluate.commands.equivariance_check import check_equivariance

        status("equivariance-check")
        equivariance = check_equivariance(checkpoint, device_name=device)
    if loaded.suite.augmentation_probe is not None:
        from hssl_cli.evaluate.commands.augmentation_probe import augmentation_probe

        status("augmentation probe")
        augmentation = augmentation_probe(checkpoint, samples=loaded.suite.augmentation_probe.samples,
                                          device_name=device)
    return {"probe": probe, "transfer": transfer, "collapse_report": collapse, "equivariance_check": equivariance,
            "augmentation_probe": augmentation}


def probe_with(settings: ProbeSettings, checkpoint: Path, device: str) -> dict:
    """hssl probe of a cell's checkpoint with a suite's probe (or transfer probe) settings, as they are."""
    from hssl_cli.evaluate.commands.probe import probe_checkpoint
    from hssl_cli.evaluate.measures.finetune_protocol import FinetuneProtocol
    from hssl_cli.evaluate.measures.linear_sgd import SgdProtocol

    training = {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                "weight_decay": settings.weight_decay}
    finetune = (FinetuneProtocol(**training, backbone_lr_scale=settings.backbone_lr_scale,
                                 optimizer=settings.optimizer) if settings.protocol == "finetune" else None)
    return probe_checkpoint(checkpoint, dataset=settings.dataset, data_root=settings.data_root,
                            features=settings.features, device_name=device, progress=False,
                            train_samples=settings.train_samples, test_samples=settings.test_samples,
                            test_rotations=settings.test_rotations, validation=settings.validation,
                            labels=settings.labels, protocol=settings.protocol, sgd=SgdProtocol(**training),
                            finetune=finetune, exact_kernel_knn=settings.exact_kernel_knn,
                            cache=False)  # each cell's checkpoint is probed once: a cache would only fill disks


def run_cell(loaded: LoadedSuite, cell: Cell, output: Path, device: str,
             progress: Callable[[dict], None] | None = None,
             diagnostics: Callable | None = None, status: Callable[[str], None] = lambda text: None) -> dict | None:
    """Run (or skip) one cell; returns its result, {"status": "interrupted"} when a stop signal (SIGTERM,
    SIGUSR1) interrupted the pretraining (the cell resumes on the next run), or None when another process
    holds the cell."""
    from hssl_cli.engine.train import pretrain
    from hssl_cli.evaluate.monitor import online_monitor

    folder = cell_folder(output, loaded, cell)
    with cell_lock(folder) as held:
        if not held:
            status("running in another process; skipped")
            return None
        finished = read_result(folder, loaded, cell)
        if finished is not None:
            status("finished earlier; skipped")
            return finished
        started, began = time.perf_counter(), datetime.now(UTC).isoformat(timespec="seconds")
        result = {"suite": loaded.name, "cell": cell.id, "index": cell.index, "variant": cell.variant.name,
                  "key": cell.key, "value": cell.value, "seed": cell.seed, "overrides": cell.overrides,
                  "recipe": recipe_to_yaml(cell.recipe), "evaluation": evaluation_settings(loaded),
                  "started": began, "provenance": provenance()}
        status("pretrain")
        monitor = online_monitor(cell.recipe)  # train.monitor: accuracy against epoch, in metrics.jsonl and result
        try:
            run = pretrain(cell.recipe, folder, device_name=device, resume="auto", progress=progress,
                           diagnostics=diagnostics, monitor=monitor)
        except TrainingDiverged as error:  # a result, not a failure of the sweep: the method diverged here
            result |= {"status": "diverged", "error": str(error), "metrics": {},
                       "seconds": round(time.perf_counter() - started, 1)}
            write_text_atomically(folder / RESULT_FILE, json.dumps(result, indent=1))
            status(f"diverged: {error}")
            return result
        if run.interrupted:
            return {"status": "interrupted"}
        evaluations = evaluate_checkpoint(loaded, run.checkpoint, device, status)
        training = last_training_row(run.run_dir)
        result |= {"status": "finished", "checkpoint": str(run.checkpoint), "steps": run.steps, **evaluations,
                   "metrics": flat_metrics(evaluations, training) | monitor_curve(run.run_dir),
                   "seconds": round(time.perf_counter() - started, 1)}
        write_text_atomically(folder / RESULT_FILE, json.dumps(result, indent=1))
        shown = ", ".join(f"{name} {result['metrics'][name]:.2f}" for name in loaded.suite.report.metrics
                          if name in result["metrics"])
        status(f"done in {result['seconds']:.0f} s: {shown}")
        return result
