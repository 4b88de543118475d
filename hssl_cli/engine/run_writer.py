"""The one owner of a run folder: recipe.yaml, metrics.jsonl and the checkpoints, for SGD runs and
closed-form fits alike. Rank-aware: on every rank but 0 each write is a no-op, so callers never ask."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hssl_cli.engine import checkpoint as ckpt
from hssl_cli.recipe import Recipe, recipe_to_yaml


class RunWriter:
    def __init__(self, run_dir: Path, recipe: Recipe, data_stats: dict[str, torch.Tensor], is_main: bool):
        self.run_dir, self.recipe, self.data_stats, self.is_main = run_dir, recipe, data_stats, is_main
        self._metrics = None
        if is_main:
            (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
            self._metrics = (run_dir / "metrics.jsonl").open("a")

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.safetensors"

    def log(self, row: dict) -> None:
        """One JSON line of metrics, flushed (a killed run keeps every row written before)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()

    def save(self, method: nn.Module, epoch: int, step: int, metrics: dict[str, float],
             optimizer: torch.optim.Optimizer | None = None, epoch_file: bool = False) -> None:
        """last.safetensors (and epoch-NNNN.safetensors when asked); with an optimiser also the training state
        that --resume reads. Each file is written atomically."""
        if not self.is_main:
            return
        if epoch_file:
            ckpt.save_model(self.run_dir / f"epoch-{epoch:04d}.safetensors", method, self.recipe, epoch, step,
                            metrics, self.data_stats)
        ckpt.save_model(self.last_checkpoint, method, self.recipe, epoch, step, metrics, self.data_stats)
        if optimizer is not None:
            ckpt.save_training_state(self.run_dir / "last.state.safetensors", method, optimizer, self.recipe,
                                     epoch, step, self.data_stats)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
