"""The GPU hot path's fast paths, checked on the CPU (issue 15): bf16 channels_last views made inside the
augmenter equal the fp32 views cast, and every method trains on them under bf16 autocast."""

import pytest
import torch

from hssl_cli.data.views import build_pipelines, draw_views
from hssl_cli.engine.optim import build_optimizer
from hssl_cli.engine.train import training_step
from hssl_cli.methods import build_method
from tests.conftest import METHOD_OVERRIDES


def test_views_made_in_bf16_channels_last_equal_the_fp32_views_cast(tiny_recipe):
    recipe = tiny_recipe()
    mean, std = torch.tensor([0.4]), torch.tensor([0.3])
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    fp32 = build_pipelines(recipe, mean, std)
    fast = build_pipelines(recipe, mean, std, "cuda", bf16=True)  # the CUDA settings, on CPU tensors
    expected = draw_views(fp32, images, torch.Generator().manual_seed(0), True, mean, std)
    views = draw_views(fast, images, torch.Generator().manual_seed(0), True, mean, std)
    for view, reference in zip([*views.global_views, views.original], [*expected.global_views, expected.original],
                               strict=True):
        assert view.dtype == torch.bfloat16 and view.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(view, reference.to(torch.bfloat16))


@pytest.mark.parametrize("case", sorted(METHOD_OVERRIDES))
def test_every_method_trains_on_bf16_views_under_bf16_autocast(tiny_recipe, case):
    recipe = tiny_recipe(*METHOD_OVERRIDES[case], "train.batch_size=16")
    mean, std = torch.tensor([0.4]), torch.tensor([0.3])
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=1).train()
    optimizer = build_optimizer(method, recipe.optim)
    pipelines = build_pipelines(recipe, mean, std, "cuda", bf16=True)
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    losses = training_step(method, optimizer, pipelines, recipe.method.consumes.original, mean, std, images,
                           torch.Generator().manual_seed(0), 1e-3, bf16=True)
    assert torch.isfinite(losses["loss"])
