"""Diagnosis for suites/dino_vs_simclr_vit.yaml (docs/reproductions.md 6), per DINO checkpoint: the teacher's
output P_t = softmax((g_t(f_t(x)) - c) / tau_t) on 512 test images, its mean per-image entropy (ln K when uniform)
and the entropy of its batch mean (0 when one prototype takes every image), the student's per-image entropy; and,
given the untrained cell of the same seed (the common initialisation theta_0), how far the teacher's and the
student's backbones moved: ||theta - theta_0|| / ||theta_0|| (for any other method's checkpoint: its backbone's).
    .venv/bin/python scripts/diagnostics/dino_teacher.py DINO.safetensors [UNTRAINED.safetensors]
"""

import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hssl_cli.data.augment import normalize
from hssl_cli.evaluate.opening import open_for_evaluation


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    return -(probabilities * probabilities.clamp_min(1e-30).log()).sum(-1)


def distance_moved(trained: dict, initial: dict, prefix: str) -> float:
    keys = [key for key in initial if key.startswith("backbone.") and initial[key].is_floating_point()]
    moved = sum(float((trained[prefix + key] - initial[key]).pow(2).sum()) for key in keys)
    return math.sqrt(moved / sum(float(initial[key].pow(2).sum()) for key in keys))


def main(checkpoint: Path, untrained: Path | None) -> None:
    from hssl_cli.methods.dino import DINO

    opened = open_for_evaluation(checkpoint, torch.device("cpu"))
    method = opened.method
    if isinstance(method, DINO):
        split = opened.read_split(opened.data.test_split)
        images = normalize(split.images[:512], opened.trained.mean, opened.trained.std)
        with torch.no_grad():
            output = method.teacher_output
            teacher = method.target["projector"](method.target["backbone"](images))
            p_teacher = torch.softmax((teacher - output.centre) / output.temperature, dim=-1)
            p_student = torch.softmax(method.projector(method.backbone(images)) / method.student_temperature, dim=-1)
        print(f"{checkpoint}: tau_t {float(output.temperature):.3f}; teacher entropy per image "
              f"{float(entropy(p_teacher).mean()):.3f}, of the batch mean {float(entropy(p_teacher.mean(0))):.3f} "
              f"(ln K {math.log(p_teacher.shape[1]):.3f}); student entropy per image "
              f"{float(entropy(p_student).mean()):.3f}")
    if untrained is not None:
        trained, initial = load_file(checkpoint), load_file(untrained)
        teacher = f", teacher {distance_moved(trained, initial, 'target.'):.3f}" if isinstance(method, DINO) else ""
        print(f"{checkpoint}: moved from the initialisation: backbone {distance_moved(trained, initial, ''):.3f}"
              f"{teacher}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
