"""World size 2 with per-rank batch B must give the same loss and gradients as world size 1 with 2B, for
every method name of the registry (and EquiMod, E-SSL, multi-crop, H-SSL's fibres).

Two gloo processes on the CPU. torch's SyncBatchNorm runs only on GPUs, so BatchNorm layers (escnn's
inner ones too) are replaced by identities here, and the methods' random draws (group elements, pairs,
EquiMod's permuted parameters, E-SSL's rotations) are replaced by a deterministic function of each image's global
index: the test isolates what hssl owns (losses over the global batch through hssl_cli.collectives, whose backward
sums gradients across ranks, the per-rank loss scaling under DDP's gradient averaging, DirectPred's all-reduced
correlation, DINO's all-reduced centre).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from hssl_cli.data.augment import Augmenter, ViewParams
from hssl_cli.data.views import Views
from hssl_cli.methods import build_method
from hssl_cli.recipe import parse_recipe
from tests.conftest import METHOD_OVERRIDES, TINY_RECIPE

PER_RANK_BATCH = 4
CASES = sorted(METHOD_OVERRIDES)


def _without_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_batchnorm(child)
    return module


def _draws_by_global_index(first_image: int) -> None:
    """Make every method draw integers as a function of the image's index in the global batch; EquiMod's
    permuted parameters swap neighbours (2i <-> 2i + 1), a permutation that stays within each rank's share."""
    import hssl_cli.methods.equimod as equimod
    import hssl_cli.methods.equivariant_heads as heads
    import hssl_cli.methods.essl as essl
    import hssl_cli.methods.fibres as fibres

    equimod.random_permutation = lambda count, generator, device: torch.arange(count, device=device) ^ 1

    calls = [0]

    def draw(low: int, high: int, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        calls[0] += 1
        index = torch.arange(first_image, first_image + count, device=device)
        return low + (3 * index + calls[0]) % (high - low)

    fibres.random_integers = heads.random_integers = essl.random_integers = draw


def _recipe(case: str):
    return parse_recipe(TINY_RECIPE, "tiny.yaml", METHOD_OVERRIDES[case])


def _views(recipe, rows: slice) -> Views:
    """The same global batch of views on every rank (seeded), cut to `rows`."""
    total = 2 * PER_RANK_BATCH
    generator = torch.Generator().manual_seed(7)
    consumes = recipe.method.consumes
    resolved = recipe.resolved_views()
    unit = torch.ones(1)
    sampler = Augmenter(recipe.augment, 16, unit, unit)

    def params() -> ViewParams:
        return ViewParams.from_vector(sampler.sample(total, generator, "cpu").as_vector()[rows])

    globals_ = [torch.randn(total, 1, 16, 16, generator=generator)[rows] for _ in range(consumes.global_views)]
    local_size = [view.size for view in resolved if view.role == "local"]
    local_count = sum(view.count for view in resolved if view.role == "local")
    locals_ = [torch.randn(total, 1, local_size[0], local_size[0], generator=generator)[rows]
               for _ in range(local_count)]
    original = torch.randn(total, 1, 16, 16, generator=generator)[rows] if consumes.original else None
    return Views(globals_, [params() for _ in globals_], locals_, [params() for _ in locals_], original)


def _loss_and_gradients(case: str, rows: slice, wrap=lambda m: m) -> dict[str, torch.Tensor]:
    recipe = _recipe(case)
    _draws_by_global_index(rows.start)
    torch.manual_seed(0)
    # float64: gradients that are zero in exact arithmetic (e.g. a bias before a standardisation) compare as zero
    method = _without_batchnorm(build_method(recipe, in_channels=1)).double()
    model = wrap(method)  # keep the DDP wrapper alive: its reducer averages gradients during backward
    torch.set_default_dtype(torch.float64)
    try:
        loss = model(_views(recipe, rows), torch.Generator())["loss"]
        loss.backward()
    finally:
        torch.set_default_dtype(torch.float32)
    result = {f"grad.{key}": p.grad.clone() for key, p in method.named_parameters() if p.grad is not None}
    result |= {key: buffer.clone() for key, buffer in method.named_buffers() if key.endswith(("correlation", "centre"))}
    return result | {"loss": loss.detach().reshape(1)}


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        for case in CASES:
            result = _loss_and_gradients(case, rows, wrap=nn.parallel.DistributedDataParallel)
            dist.all_reduce(result["loss"])
            result["loss"] /= world_size  # DDP averages gradients; the global loss is the mean of ranks'
            if rank == 0:
                save_file(result, f"{out_dir}/{case}.safetensors")
        dist.barrier()  # neither rank tears gloo down while the other may still be using it
    finally:
        dist.destroy_process_group()


def _single_worker(_: int, out_dir: str) -> None:
    """The reference, also in its own process: models cast to float64 leave escnn's shared basis caches
    in float64, which must not leak into the tests that follow in the pytest process."""
    torch.set_num_threads(1)
    for case in CASES:
        save_file(_loss_and_gradients(case, slice(0, 2 * PER_RANK_BATCH)), f"{out_dir}/single-{case}.safetensors")


def test_two_ranks_match_one_rank_with_the_double_batch(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    mp.spawn(_single_worker, args=(str(tmp_path),), nprocs=1, join=True)
    for case in CASES:
        single = load_file(tmp_path / f"single-{case}.safetensors")
        double = load_file(tmp_path / f"{case}.safetensors")
        assert single.keys() == double.keys(), case
        for key in single:
            assert torch.allclose(single[key], double[key], atol=1e-5, rtol=1e-4), (case, key)
        assert single["loss"].item() != 0 and any(single[key].abs().sum() > 0 for key in single if "grad" in key)


def test_sync_bn_converts_the_heads_by_default_the_backbones_only_when_asked():
    from hssl_cli.engine.distributed import sync_batchnorm

    def kinds(method: nn.Module) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for name, module in method.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                place = "backbone" if "backbone" in name.split(".") else "heads"
                found.setdefault(place, set()).add(type(module).__name__)
        return found

    recipe = _recipe("byol")
    assert recipe.model.sync_bn == "heads"
    heads = sync_batchnorm(build_method(recipe, in_channels=1), "heads")
    assert kinds(heads) == {"backbone": {"BatchNorm2d"}, "heads": {"SyncBatchNorm"}}
    assert isinstance(heads.target["projector"][1], nn.SyncBatchNorm)  # the target's projector too
    assert kinds(sync_batchnorm(build_method(recipe, in_channels=1), "all")) == {
        "backbone": {"SyncBatchNorm"}, "heads": {"SyncBatchNorm"}}
    assert kinds(sync_batchnorm(build_method(recipe, in_channels=1), "none")) == {
        "backbone": {"BatchNorm2d"}, "heads": {"BatchNorm1d"}}


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_that_requires_a_gradient_gets_one(case):
    """DDP (find_unused_parameters off) waits for a gradient of every parameter that requires one: one the loss
    never reaches (a vit's blocks after the block H-SSL reads) would leave its bucket un-averaged on every rank."""
    recipe = _recipe(case)
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=1)
    loss = method(_views(recipe, slice(0, 2 * PER_RANK_BATCH)), torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert [name for name, p in method.named_parameters() if p.requires_grad and p.grad is None] == []
