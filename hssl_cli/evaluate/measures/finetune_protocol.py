"""The settings of fine-tuning evaluation (`hssl probe --protocol finetune`, a suite's probe), without torch so
that a suite is checked in a fraction of a second; the training itself is finetune.py."""

from __future__ import annotations

from dataclasses import dataclass

from hssl_cli.errors import HsslError

OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}  # for batch 256: SimCLR's 0.05 x batch/256; AdamW's usual 1e-3


def check_training_ranges(epochs: int, batch_size: int) -> None:
    """The epochs and batch size every trained protocol (standard, finetune) accepts."""
    for name, value, low in (("--epochs", epochs, 1), ("--batch-size", batch_size, 2)):
        if value < low:
            raise HsslError(f"{name} {value}: give at least {low}")


@dataclass(frozen=True)
class FinetuneProtocol:
    epochs: int = 30                 # SimCLR: 30 epochs on 10% of the labels, 60 on 1%
    lr: float | None = None          # the head's, for batch 256, scaled linearly with the batch; None: DEFAULT_LR
    batch_size: int = 256
    weight_decay: float = 0.0
    backbone_lr_scale: float = 0.1   # the backbone's learning rate = this x the head's
    optimizer: str = "sgd"
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        """The ranges `hssl probe --protocol finetune` and a suite's probe accept."""
        check_training_ranges(self.epochs, self.batch_size)
        if self.optimizer not in OPTIMIZERS:
            raise HsslError(f"--optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        if not (0 < self.head_lr <= 100 and 0 <= self.weight_decay <= 10 and 0 <= self.backbone_lr_scale <= 10):
            raise HsslError(f"--lr {self.head_lr:g} / --weight-decay {self.weight_decay:g} / --backbone-lr-scale "
                            f"{self.backbone_lr_scale:g}: give 0 < lr <= 100, 0 <= weight decay <= 10 and 0 <= "
                            "backbone lr scale <= 10")

    @property
    def head_lr(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def describe(self, image_count: int | None = None) -> str:
        """The settings in a line; with `image_count`, the batch actually used (never more than the images)."""
        optimizer = "SGD (Nesterov 0.9)" if self.optimizer == "sgd" else "AdamW"
        batch = self.batch_size if image_count is None else min(self.batch_size, image_count)
        return (f"fine-tuned end to end: {optimizer} {self.epochs} epochs, batch {batch}, head lr "
                f"{self.head_lr:g} x batch/256, backbone lr x {self.backbone_lr_scale:g}, cosine, wd "
                f"{self.weight_decay:g}, crop+flip")
