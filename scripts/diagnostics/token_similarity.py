"""Diagnosis for suites/hssl_tokens_vit.yaml (docs/reproductions.md 1d): how alike two tokens of ONE image are
(H-SSL's positive pair) against tokens of two different images (its negatives), on the last block's token grid,
for each arm's seed-0 checkpoint, and the same for the pseudo-tokens the shuffled arm pairs: mean cosine over
512 test images.
    .venv/bin/python scripts/diagnostics/token_similarity.py /work/sweeps/hssl_tokens_vit
"""

import json
import sys
from pathlib import Path

import torch

from hssl_cli.data.augment import normalize
from hssl_cli.evaluate.opening import open_for_evaluation
from hssl_cli.models.spatial import feature_map

CELLS = ("untrained-seed0", "assl_crops-seed0", "hssl-seed0", "hssl_posemb-seed0", "shuffled-seed0")


def mean_cosines(fibres: torch.Tensor) -> tuple[float, float]:
    """(two different fibres of one image, fibres of image b and image b - 1): mean cosine of (B, F, C) fibres."""
    unit = torch.nn.functional.normalize(fibres, dim=-1)
    within = unit @ unit.transpose(1, 2)
    different = ~torch.eye(unit.shape[1], dtype=torch.bool)
    across = torch.einsum("bpd,bqd->bpq", unit, unit.roll(1, dims=0))
    return float(within[:, different].mean()), float(across.mean())


def main(suite_folder: Path) -> None:
    for cell in CELLS:
        checkpoint = json.loads((suite_folder / "cells" / cell / "result.json").read_text())["checkpoint"]
        opened = open_for_evaluation(Path(checkpoint), torch.device("cpu"))
        split = opened.read_split(opened.data.test_split)
        images = normalize(split.images[:512], opened.trained.mean, opened.trained.std)
        method = opened.method
        with torch.no_grad():
            tokens = feature_map(method.backbone, images).flatten(2).transpose(1, 2)  # (B, h w, D)
            kinds = {"tokens": tokens}
            mixer = getattr(method, "mixer", None)  # H-SSL's ablation; other methods have none
            if mixer is not None:
                kinds["pseudo-tokens"] = mixer(tokens)
            for kind, fibres in kinds.items():
                same, other = mean_cosines(fibres)
                print(f"{cell:20s} {kind:13s} same image {same:.3f}  other images {other:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
