"""World size 2 with per-rank batch B must give the same loss and gradients as world size 1 with 2B.

Two gloo processes on the CPU. torch's SyncBatchNorm runs only on GPUs, so BatchNorm layers are
replaced by identities here: the test isolates what hssl owns (gathered negatives whose backward sums
gradients across ranks, the per-rank loss scaling under DDP's gradient averaging, DirectPred's
all-reduced correlation).
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from hssl_cli.methods import build_method
from hssl_cli.recipe import parse_recipe
from tests.conftest import TINY_RECIPE

METHODS = {
    "simclr": [],
    "byol": ["method={name: byol, predictor: [64, 32]}"],
    "vicreg": ["method={name: vicreg}"],
    "directpred": ["method={name: directpred}"],  # C is all-reduced: every rank's W_P is the 1-rank W_P
    "isoloss": ["method={name: directpred, loss: iso}"],
}
PER_RANK_BATCH = 4


def _without_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_batchnorm(child)
    return module


def _views(total: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(total, 1, 16, 16, generator=generator) for _ in range(2)]


def _loss_and_gradients(name: str, views: list[torch.Tensor], wrap=lambda m: m) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    method = _without_batchnorm(build_method(parse_recipe(TINY_RECIPE, "tiny.yaml", METHODS[name]), in_channels=1))
    model = wrap(method)  # keep the DDP wrapper alive: its reducer averages gradients during backward
    loss = model(views)["loss"]
    loss.backward()
    result = {f"grad.{key}": p.grad.clone() for key, p in method.named_parameters() if p.grad is not None}
    result |= {key: buffer.clone() for key, buffer in method.named_buffers() if key.endswith("correlation")}
    return result | {"loss": loss.detach().reshape(1)}


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        views = _views(world_size * PER_RANK_BATCH)
        share = [view[rank * PER_RANK_BATCH:(rank + 1) * PER_RANK_BATCH] for view in views]
        for name in METHODS:
            result = _loss_and_gradients(name, share, wrap=nn.parallel.DistributedDataParallel)
            dist.all_reduce(result["loss"])
            result["loss"] /= world_size  # DDP averages gradients; the global loss is the mean of ranks'
            if rank == 0:
                save_file(result, f"{out_dir}/{name}.safetensors")
        dist.barrier()  # neither rank tears gloo down while the other may still be using it
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_rank_with_the_double_batch(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in METHODS:
        single = _loss_and_gradients(name, _views(2 * PER_RANK_BATCH))
        double = load_file(tmp_path / f"{name}.safetensors")
        assert single.keys() == double.keys(), name
        for key in single:
            assert torch.allclose(single[key], double[key], atol=1e-5, rtol=1e-4), (name, key)
        assert single["loss"].item() != 0 and any(single[key].abs().sum() > 0 for key in single if "grad" in key)
