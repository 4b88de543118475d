"""The one owner of a run folder: recipe.yaml, metrics.jsonl and the checkpoints, for SGD runs and
closed-form fits alike. Rank-aware: on every rank but 0 each write is a no-op, so callers never ask."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from hssl_cli.engine import checkpoint as ckpt
from hssl_cli.engine.loggers import open_loggers
from hssl_cli.errors import HsslError
from hssl_cli.files import remove_stale_temp_files
from hssl_cli.recipe import Recipe, recipe_to_yaml


def unwritable(folder: Path, error: Exception) -> HsslError:
    reason = getattr(error, "strerror", None) or str(error)
    return HsslError(f"{folder}: cannot write the run's files ({reason}); free some space or choose a writable "
                     "--output (checkpoints already written there are intact)")


class RunWriter:
    def __init__(self, run_dir: Path, recipe: Recipe, data_stats: dict[str, torch.Tensor], is_main: bool,
                 resumed_step: int = 0):
        self.run_dir, self.recipe, self.data_stats, self.is_main = run_dir, recipe, data_stats, is_main
        self._metrics = None
        self._loggers: list = []
        if is_main:
            remove_stale_temp_files(run_dir)  # of a write a kill -9 interrupted
            try:
                (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
                self._metrics = (run_dir / "metrics.jsonl").open("a")
                self._loggers = open_loggers(recipe.train.loggers, run_dir, recipe, resumed_step)
            except OSError as error:
                raise unwritable(run_dir, error) from None

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.safetensors"

    def log(self, row: dict) -> None:
        """One JSON line of metrics, flushed (a killed run keeps every row written before)."""
        if self._metrics is not None:
            try:
                self._metrics.write(json.dumps(row) + "\n")
                self._metrics.flush()
                for logger in self._loggers:
                    logger.log(row)
            except OSError as error:
                raise unwritable(self.run_dir, error) from None

    def save(self, method: nn.Module, epoch: int, step: int, metrics: dict[str, float],
             optimizer: torch.optim.Optimizer | None = None, epoch_file: bool = False) -> None:
        """last.safetensors (and epoch-NNNN.safetensors when asked); with an optimiser also the training state
        that --resume reads. Each file is written atomically."""
        if not self.is_main:
            return
        try:
            self._save(method, epoch, step, metrics, optimizer, epoch_file)
        except (OSError, SafetensorError) as error:
            raise unwritable(self.run_dir, error) from None

    def _save(self, method: nn.Module, epoch: int, step: int, metrics: dict[str, float],
              optimizer: torch.optim.Optimizer | None, epoch_file: bool) -> None:
        if epoch_file:
            ckpt.save_model(self.run_dir / f"epoch-{epoch:04d}.safetensors", method, self.recipe, epoch, step,
                            metrics, self.data_stats)
        ckpt.save_model(self.last_checkpoint, method, self.recipe, epoch, step, metrics, self.data_stats)
        if optimizer is not None:
            ckpt.save_training_state(self.run_dir / "last.state.safetensors", method, optimizer, self.recipe,
                                     epoch, step, self.data_stats)

    def close(self) -> None:
        loggers, self._loggers = self._loggers, []
        try:
            for logger in loggers:
                logger.close()
        except OSError as error:
            raise unwritable(self.run_dir, error) from None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
