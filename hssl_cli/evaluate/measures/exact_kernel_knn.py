"""kNN under the exact base kernel of a kernel-regime checkpoint (`hssl probe --exact-kernel-knn`): the
similarity is k(x, x') on normalised pixels itself, not the inner product of the learned features."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hssl_cli.errors import HsslError

if TYPE_CHECKING:
    from hssl_cli.evaluate.opening import TrainedMethod


def exact_kernel_knn(trained: TrainedMethod, train_images: torch.Tensor, train_labels: torch.Tensor,
                     test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                     neighbours: tuple[int, ...]) -> dict:
    """{knn_k<K>_exact_kernel: top-1/top-5} for each K of `neighbours`, T = 0.07; random Fourier features stand
    for the RBF kernel they approximate (same bandwidth)."""
    from hssl_cli.data.augment import normalize
    from hssl_cli.evaluate.measures.frozen_probes import knn_votes
    from hssl_cli.methods.kernel import KernelFeatureMap
    from hssl_cli.models.kernels import exact_kernel, gram

    feature_map = trained.method.backbone
    if not isinstance(feature_map, KernelFeatureMap):
        raise HsslError(f"the exact-kernel kNN needs a kernel-regime checkpoint (method kernel), not "
                        f"{type(trained.method).__name__}")
    try:
        kernel = exact_kernel(feature_map.kernel)
    except ValueError as error:
        raise HsslError(f"the exact-kernel kNN: {error}") from None
    device = trained.mean.device
    train_pixels = normalize(train_images.to(device), trained.mean, trained.std)
    test_pixels = normalize(test_images.to(device), trained.mean, trained.std)
    votes = knn_votes(lambda start, stop: gram(kernel, test_pixels[start:stop], train_pixels), len(test_pixels),
                      train_labels.to(device), test_labels, num_classes, neighbours)
    return {f"knn_k{k}_exact_kernel": {**knn, "protocol": "knn", "detail": "exact base kernel, T=0.07"}
            for k, knn in votes.items()}
