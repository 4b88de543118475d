"""torch.distributed set-up from torchrun's or SLURM's environment; the one module that reads it.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under `srun` the SLURM_*
variables give the rank and size; the job script exports MASTER_ADDR (the first host of the job) and
optionally MASTER_PORT (default 29500), see scripts/slurm/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hssl_cli.errors import HsslError


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool | torch.Tensor, device: torch.device) -> bool:
        """True on every rank when the flag is true on any rank (one collective, at log steps only)."""
        value = torch.as_tensor(flag, dtype=torch.int32, device=device).clone()
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Average scalar tensors over ranks (for logging)."""
        if not self.enabled or not values:
            return values
        stacked = torch.stack([value.float() for value in values.values()])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return dict(zip(values, stacked / self.world_size, strict=True))

    def barrier(self) -> None:
        """Wait for every rank; before tearing down, so that no rank leaves while others still talk."""
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's value on every rank (e.g. the run folder's name)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _environment() -> tuple[int, int, int]:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when launched with several processes; returns the rank's device."""
    rank, world_size, local_rank = _environment()
    context = Distributed(rank, world_size, local_rank)
    if not context.enabled:
        return context, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise HsslError("distributed run without MASTER_ADDR: launch with torchrun, or export MASTER_ADDR "
                            "(the first host of the job) in the SLURM script, see scripts/slurm/")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return context, device


def teardown(context: Distributed) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def sync_batchnorm(method: nn.Module, mode: str) -> nn.Module:
    """model.sync_bn: `heads` (default) turns the BatchNorm layers outside every backbone (projector,
    predictor, EquiMod's heads: where the method's batch statistics must span the global batch) into
    SyncBatchNorm; `all` every BatchNorm (the backbone's too: 2 collectives per layer per pass); `none` none,
    each rank normalising its own share."""
    if mode == "all":
        return nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if mode == "heads":
        for name, child in method.named_children():
            if name != "backbone":  # the online backbone, and the target's (target.backbone)
                setattr(method, name, sync_batchnorm(child, mode) if not isinstance(child, _BatchNorm)
                        else nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return method


def wrap(method: nn.Module, context: Distributed, device: torch.device, sync_bn: str = "heads") -> nn.Module:
    """DDP, with SyncBatchNorm on CUDA where `sync_bn` says (sync_batchnorm). Buffers are not broadcast each
    forward (rank 0's, which it checkpoints, are the same either way) and gradients are bucket views (no
    copy into DDP's buckets).

    (torch's SyncBatchNorm runs only on GPUs; on the CPU each rank normalises its own share.)
    """
    if not context.enabled:
        return method
    if device.type == "cuda":
        method = sync_batchnorm(method, sync_bn)
    # buffers synced once at the start (the ranks' BatchNorm statistics then their own), not every forward
    return nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False, gradient_as_bucket_view=True)
