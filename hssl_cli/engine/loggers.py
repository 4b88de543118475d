"""Where a run's metric rows go besides metrics.jsonl (always written: `hssl plot` and `hssl sweep` read
it): `train.loggers` adds a CSV file, TensorBoard event files and a Weights & Biases run. Each logger takes
the same rows ({"step", "epoch", name: value, ...}) and keeps only the numbers."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from hssl_cli.recipe import Recipe

CSV_FILE = "metrics.csv"
TENSORBOARD_FOLDER = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"


def numeric_metrics(row: dict) -> dict[str, float]:
    """The row's finite numbers other than step and epoch (strings such as init_from are left out)."""
    return {name: float(value) for name, value in row.items()
            if name not in ("step", "epoch") and isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value)}


class CsvLogger:
    """metrics.csv in long form, one line per metric: step,epoch,metric,value. Rows of different kinds
    (losses, diagnostics, monitor) carry different metrics, so a fixed header would not fit them all;
    `pandas.read_csv(...).pivot_table(index="step", columns="metric", values="value")` gives the wide table."""

    def __init__(self, run_dir: Path):
        path = run_dir / CSV_FILE
        new = not path.exists()
        self._file = path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["step", "epoch", "metric", "value"])

    def log(self, row: dict) -> None:
        for name, value in numeric_metrics(row).items():
            self._writer.writerow([row["step"], row.get("epoch", ""), name, repr(value)])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """Event files in <run>/tensorboard/ (`tensorboard --logdir checkpoints/`). A resumed run purges the
    events a killed run wrote after its last checkpoint's step, so curves do not double back."""

    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / TENSORBOARD_FOLDER), purge_step=resumed_step or None)

    def log(self, row: dict) -> None:
        for name, value in numeric_metrics(row).items():
            self._writer.add_scalar(name, value, global_step=int(row["step"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A Weights & Biases run (project $WANDB_PROJECT, default hssl) named after the run folder, with the
    resolved recipe as its config; the run id is kept in the folder, so --resume continues the same W&B run.
    Offline or online as the user's W&B settings say (WANDB_MODE)."""

    def __init__(self, run_dir: Path, recipe: Recipe):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hssl"), id=run_id, resume="allow",
                               name=f"{recipe.name}/{run_dir.name}", dir=str(run_dir),
                               config=recipe.model_dump(mode="json"))

    def log(self, row: dict) -> None:
        self._run.log(numeric_metrics(row) | {"epoch": row.get("epoch", 0)}, step=int(row["step"]))

    def close(self) -> None:
        self._run.finish()


def open_loggers(names: list[str], run_dir: Path, recipe: Recipe, resumed_step: int) -> list:
    """The loggers `train.loggers` names beyond jsonl (which RunWriter writes itself)."""
    made = {"csv": lambda: CsvLogger(run_dir), "tensorboard": lambda: TensorBoardLogger(run_dir, resumed_step),
            "wandb": lambda: WandbLogger(run_dir, recipe)}
    return [made[name]() for name in dict.fromkeys(names) if name != "jsonl"]
