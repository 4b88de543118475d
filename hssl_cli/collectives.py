"""Every collective a loss or a method needs, in one place: a loss over the whole batch (NT-Xent's
negatives, VICReg's and Barlow Twins' statistics, DirectPred's correlation) reads the global batch
through these, so N ranks with B images each compute what one process with N B images would.

Each is the identity (or a no-op) when torch.distributed is not initialised.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over all ranks (rank order, along dim 0); the backward SUMS the gradients that
    every rank sends back (torch.distributed.nn's all_gather), so a loss of the gathered batch has the same
    gradient for 1 or N ranks once DDP averages it."""
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of _functional_collectives, whose backward (reduce_scatter) gloo lacks.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor), dim=0)


def first_row(local_rows: int) -> int:
    """Where this rank's rows start in a tensor gathered by `gather_with_grad` (equal shares per rank)."""
    return local_rows * rank()


@torch.no_grad()
def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks, without gradient (e.g. a correlation every rank must hold alike)."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor
