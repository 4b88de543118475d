"""Batched augmentation: exact replay of recorded parameters, per-sample independence, the config's
ranges, and agreement with torchvision's transforms (op by op, and in distribution)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from hssl_cli.data.augment import PARAM_NAMES, Augmenter, ViewParams, normalize
from hssl_cli.data.statistics import channel_stats
from hssl_cli.recipe import AugmentConfig

EVERYTHING_ON = {
    "crop_scale": (0.2, 1.0), "flip": 0.5,
    "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "grayscale": 0.2, "blur": {"p": 0.5, "sigma": (0.1, 2.0), "kernel_size": 3}, "solarize": 0.2,
}  # fmt: skip
NOTHING_ON = {
    "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip": 0.0, "color_jitter": {"p": 0.0},
    "grayscale": 0.0, "blur": {"p": 0.0}, "solarize": 0.0,
}  # fmt: skip


def make_augmenter(channels: int = 3, image_size: int = 32, **config) -> Augmenter:
    """An augmenter whose output is the [0, 1] image itself (mean 0, std 1)."""
    return Augmenter(AugmentConfig(**config), image_size, torch.zeros(channels), torch.ones(channels))


def random_images(batch: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=generator)


@functools.cache
def photo_patches() -> torch.Tensor:
    """64 uint8 32x32 RGB patches of scikit-learn's two sample photos (64x64 cuts, 2x2 averaged)."""
    from sklearn.datasets import load_sample_images

    patches = []
    for photo in load_sample_images().images:  # china.jpg, flower.jpg: 427 x 640 x 3
        image = torch.from_numpy(photo.copy()).permute(2, 0, 1).float()
        for top in range(0, 4 * 96, 96):
            for left in range(0, 8 * 76, 76):
                patches.append(image[:, top:top + 64, left:left + 64])
    return F.avg_pool2d(torch.stack(patches), 2).round().to(torch.uint8)


def as_floats(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def test_param_names_follow_the_equimod_layout():
    assert PARAM_NAMES[:6] == ("crop_i", "crop_j", "crop_h", "crop_w", "flip", "jitter_applied")
    assert PARAM_NAMES[6:10] == tuple(f"jitter_order_{r}" for r in range(4))
    assert PARAM_NAMES[10:] == ("brightness", "contrast", "saturation", "hue", "grayscale", "blur_applied",
                                "blur_sigma", "solarize")
    identity = ViewParams.identity(2, "cpu").as_vector()
    expected = [0, 0, 1, 1, 0, 0, 0, 1, 2, 3, 1, 1, 1, 0, 0, 0, 0, 0]
    assert identity.dtype == torch.float32
    assert torch.equal(identity, torch.tensor([expected] * 2, dtype=torch.float32))


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_params_give_the_normalized_images_back(channels):
    images = random_images(8, channels)
    mean, std = torch.linspace(0.3, 0.6, channels), torch.linspace(0.2, 0.3, channels)
    augmenter = Augmenter(AugmentConfig(**EVERYTHING_ON), 32, mean, std)
    expected = normalize(images, mean, std)
    assert torch.allclose(augmenter.apply(images, ViewParams.identity(8, "cpu")), expected, atol=1e-5)
    # A config that cannot change anything samples the identity.
    unchanged = Augmenter(AugmentConfig(**NOTHING_ON), 32, mean, std)
    assert torch.allclose(unchanged(images, torch.Generator().manual_seed(0)), expected, atol=1e-5)


def test_params_survive_the_vector_round_trip_and_give_the_same_views_exactly():
    augmenter = make_augmenter(**EVERYTHING_ON)
    images = random_images(64)
    params = augmenter.sample(64, torch.Generator().manual_seed(1), "cpu")
    vector = params.as_vector()
    rebuilt = ViewParams.from_vector(vector)
    assert vector.shape == (64, len(PARAM_NAMES))
    assert torch.equal(rebuilt.as_vector(), vector)
    assert torch.equal(augmenter.apply(images, rebuilt), augmenter.apply(images, params))


def test_reapplying_recorded_params_reproduces_the_views_exactly():
    augmenter = make_augmenter(**EVERYTHING_ON)
    images = random_images(64)
    views, params = augmenter(images, torch.Generator().manual_seed(2), with_params=True)
    assert torch.equal(augmenter.apply(images, params), views)
    assert torch.equal(augmenter.apply(images, ViewParams.from_vector(params.as_vector())), views)


def test_same_seed_gives_identical_views_and_another_seed_different_ones():
    augmenter = make_augmenter(**EVERYTHING_ON)
    images = random_images(32)
    first = augmenter(images, torch.Generator().manual_seed(3))
    again = augmenter(images, torch.Generator().manual_seed(3))
    other = augmenter(images, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert (first - other).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.9


def test_samples_of_one_batch_draw_independent_parameters():
    augmenter = make_augmenter(**EVERYTHING_ON)
    image = random_images(1).expand(256, -1, -1, -1)
    views, params = augmenter(image, torch.Generator().manual_seed(5), with_params=True)
    assert len({tuple(box) for box in params.crop.tolist()}) > 200
    applied = params.jitter_applied
    assert params.jitter_factors[applied, 0].unique().numel() == applied.sum()
    assert views.flatten(1).unique(dim=0).shape[0] > 250
    # Over many batches, what sample 0 draws says nothing about what sample 1 draws.
    generator = torch.Generator().manual_seed(6)
    vectors = torch.stack([augmenter.sample(4, generator, "cpu").as_vector() for _ in range(1000)])
    for column in ("crop_i", "crop_h", "flip", "jitter_applied", "brightness", "hue", "blur_sigma"):
        index = PARAM_NAMES.index(column)
        pair = torch.stack([vectors[:, 0, index], vectors[:, 1, index]])
        # 1000 pairs: the correlation's standard error is about 1/sqrt(1000) = 0.032.
        assert torch.corrcoef(pair)[0, 1].abs() < 0.15, column


def test_sampled_parameters_respect_the_config():
    config = {
        "crop_scale": (0.08, 0.5), "crop_ratio": (0.75, 4 / 3), "flip": 0.3,
        "color_jitter": {"p": 0.6, "brightness": 0.4, "contrast": 1.5, "saturation": 0.2, "hue": 0.1},
        "grayscale": 0.25, "blur": {"p": 0.4, "sigma": (0.5, 1.5)}, "solarize": 0.15,
    }  # fmt: skip
    params = make_augmenter(**config).sample(20000, torch.Generator().manual_seed(7), "cpu")
    pixels = params.crop * 32
    assert torch.equal(pixels, pixels.round()), "crop boxes lie on the pixel grid"
    top, left, height, width = pixels.unbind(dim=1)
    assert top.min() >= 0 and left.min() >= 0 and (top + height).max() <= 32 and (left + width).max() <= 32
    # Height and width are rounded to whole pixels, so area and ratio hold up to half a pixel per side.
    assert ((height + 0.5) * (width + 0.5) >= 0.08 * 1024).all()
    assert ((height - 0.5) * (width - 0.5) <= 0.5 * 1024).all()
    assert ((width + 0.5) / (height - 0.5) >= 0.75).all() and ((width - 0.5) / (height + 0.5) <= 4 / 3).all()
    area = height * width / 1024
    assert area.min() < 0.1 and area.max() > 0.45, "the whole scale range is used"
    # 20000 draws: a rate's standard error is below 0.0036, so 0.02 is more than 5 of them.
    for drawn, rate in [(params.flip, 0.3), (params.jitter_applied, 0.6), (params.grayscale, 0.25),
                        (params.blur_sigma > 0, 0.4), (params.solarize, 0.15)]:
        assert abs(drawn.float().mean().item() - rate) < 0.02
    applied = params.jitter_applied
    factors = params.jitter_factors[applied]
    for column, (low, high) in enumerate([(0.6, 1.4), (0.0, 2.5), (0.8, 1.2), (-0.1, 0.1)]):
        assert factors[:, column].min() >= low and factors[:, column].max() <= high
        assert abs(factors[:, column].mean().item() - (low + high) / 2) < 0.02 * (high - low)
    not_applied = int((~applied).sum())
    assert torch.equal(params.jitter_factors[~applied], torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(not_applied, 4))
    assert torch.equal(params.jitter_order.sort(dim=1).values, torch.arange(4).expand(20000, 4))
    first_op_rates = torch.bincount(params.jitter_order[applied, 0], minlength=4) / applied.sum()
    assert (first_op_rates - 0.25).abs().max() < 0.02
    sigma = params.blur_sigma[params.blur_sigma > 0]
    assert sigma.min() >= 0.5 and sigma.max() <= 1.5


def test_crop_falls_back_to_the_central_crop_cut_to_the_ratio_range():
    never_fits = make_augmenter(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 3.0))
    params = never_fits.sample(16, torch.Generator().manual_seed(8), "cpu")
    assert torch.equal(params.crop, torch.tensor([[0.25, 0.0, 0.5, 1.0]]).expand(16, 4))
    # A 32x64 input is wider than 4/3 allows: the full height and 43 = round(32 * 4/3) columns.
    wide = make_augmenter(crop_scale=(1.0, 1.0))
    params = wide.sample(16, torch.Generator().manual_seed(8), "cpu", input_size=(32, 64))
    assert torch.allclose(params.crop, torch.tensor([[0.0, 10 / 64, 1.0, 43 / 64]]).expand(16, 4))


@pytest.mark.parametrize("input_size", [32, 64])
def test_crop_and_flip_match_torchvision_resized_crop(input_size):
    images = random_images(16, size=input_size)
    generator = torch.Generator().manual_seed(9)
    geometry_only = {**NOTHING_ON, "crop_scale": (0.1, 1.0), "crop_ratio": (0.75, 4 / 3), "flip": 0.5}
    augmenter = make_augmenter(**geometry_only)
    params = augmenter.sample(16, generator, "cpu", input_size=(input_size, input_size))
    views = augmenter.apply(images, params)
    boxes = (params.crop * input_size).round().long().tolist()
    for image, view, (top, left, height, width), flip in zip(images, views, boxes, params.flip, strict=True):
        # No antialiasing: one grid_sample is plain bilinear, which is what it is when upsampling.
        expected = TF.resized_crop(as_floats(image), top, left, height, width, [32, 32], antialias=False)
        expected = TF.horizontal_flip(expected) if flip else expected
        assert torch.allclose(view, expected, atol=1e-5)


@pytest.mark.parametrize(("op", "adjust", "low", "high", "tolerance"), [
    (0, TF.adjust_brightness, 0.5, 1.5, 1e-5),
    # Contrast and saturation: 0.299 red weight here, torchvision's 0.2989, a 1e-4 difference at most.
    (1, TF.adjust_contrast, 0.2, 1.8, 1e-4),
    (2, TF.adjust_saturation, 0.0, 2.0, 1e-4),
    (3, TF.adjust_hue, -0.5, 0.5, 1e-3),
])  # fmt: skip
def test_each_colour_op_matches_torchvision_functional(op, adjust, low, high, tolerance):
    images = photo_patches()[:32]
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(32, 1)
    factors[:, op] = torch.linspace(low, high, 32)
    params = ViewParams.identity(32, "cpu")
    params.jitter_applied = torch.ones(32, dtype=torch.bool)
    params.jitter_factors = factors
    views = make_augmenter().apply(images, params)
    expected = torch.stack([adjust(as_floats(image), float(factor)) for image, factor in zip(
        images, factors[:, op], strict=True)])
    assert (views - expected).abs().max() < tolerance


def replay_with_torchvision(image: torch.Tensor, params: ViewParams, index: int, kernel_size: int):
    """One view rebuilt from its recorded parameters with torchvision's functional ops, in SimCLR order.

    Returns the view and the values that went into solarize (to skip pixels at its threshold).
    """
    top, left, height, width = (params.crop[index] * image.shape[-1]).round().long().tolist()
    view = TF.resized_crop(as_floats(image), top, left, height, width, [32, 32], antialias=True)
    view = TF.horizontal_flip(view) if params.flip[index] else view
    if params.jitter_applied[index]:
        adjusts = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in params.jitter_order[index].tolist():
            view = adjusts[op](view, float(params.jitter_factors[index, op]))
    view = TF.rgb_to_grayscale(view, num_output_channels=3) if params.grayscale[index] else view
    sigma = float(params.blur_sigma[index])
    view = TF.gaussian_blur(view, [kernel_size] * 2, [sigma] * 2) if sigma > 0 else view
    return (TF.solarize(view, 0.5) if params.solarize[index] else view), view


def test_views_equal_torchvision_functional_ops_replaying_the_same_params():
    images = photo_patches()
    augmenter = make_augmenter(**{**EVERYTHING_ON, "color_jitter": {**EVERYTHING_ON["color_jitter"], "hue": 0.3}})
    views, params = augmenter(images, torch.Generator().manual_seed(10), with_params=True)
    assert len({tuple(order) for order in params.jitter_order.tolist()}) > 12, "orders vary per sample"
    for index, (image, view) in enumerate(zip(images, views, strict=True)):
        expected, before_solarize = replay_with_torchvision(image, params, index, augmenter.blur_kernel_size)
        # A 1e-6 difference flips a pixel at the solarize threshold; those pixels say nothing.
        clear = (before_solarize - 0.5).abs() > 1e-3 if params.solarize[index] else torch.ones_like(view).bool()
        # Hue's HSV round trip differs from torchvision's by ~1e-6; 1e-3 is the brief's margin for it.
        assert (view - expected)[clear].abs().max() < 1e-3, index


def test_grayscale_blur_and_solarize_match_torchvision_functional():
    images = photo_patches()[:16]
    identity = ViewParams.identity(16, "cpu")
    augmenter = make_augmenter(blur={"kernel_size": 5}).reference()  # params its config (blur p 0) never draws
    floats = as_floats(images)

    everywhere = torch.ones(16, dtype=torch.bool)
    gray = augmenter.apply(images, ViewParams(**{**vars(identity), "grayscale": everywhere}))
    assert (gray - TF.rgb_to_grayscale(floats, num_output_channels=3)).abs().max() < 1e-4

    sigma = torch.linspace(0.1, 3.0, 16)
    blurred = augmenter.apply(images, ViewParams(**{**vars(identity), "blur_sigma": sigma}))
    expected = torch.stack([TF.gaussian_blur(image, [5, 5], [float(s)] * 2) for image, s in zip(
        floats, sigma, strict=True)])
    assert (blurred - expected).abs().max() < 1e-5

    solarized = augmenter.apply(images, ViewParams(**{**vars(identity), "solarize": everywhere}))
    assert (solarized - TF.solarize(floats, 0.5)).abs().max() < 1e-6


def view_features(views: torch.Tensor, repeats: int) -> torch.Tensor:
    """(images * repeats, 3, H, W) -> (images, repeats, 8): each view's channel means, channel stds,
    mean chroma (grayscale, saturation) and mean horizontal gradient (crop zoom, blur)."""
    chroma = views.amax(dim=1) - views.amin(dim=1)
    gradient = (views[..., 1:] - views[..., :-1]).abs()
    features = torch.cat([views.mean(dim=(2, 3)), views.std(dim=(2, 3)), chroma.mean(dim=(1, 2))[:, None],
                          gradient.mean(dim=(1, 2, 3))[:, None]], dim=1)
    return features.double().view(-1, repeats, features.shape[1])


def test_view_statistics_match_torchvision_pipeline():
    images, repeats = photo_patches(), 48
    config = AugmentConfig(**EVERYTHING_ON)
    jitter, blur = config.color_jitter, config.blur
    pipeline = v2.Compose([
        v2.RandomResizedCrop(32, scale=config.crop_scale, ratio=config.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(config.flip),
        v2.RandomApply([v2.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)],
                       p=jitter.p),
        v2.RandomGrayscale(config.grayscale),
        v2.RandomApply([v2.GaussianBlur(blur.kernel_size, blur.sigma)], p=blur.p),
        v2.RandomSolarize(0.5, p=config.solarize),
    ])  # fmt: skip
    torch.manual_seed(11)
    reference = torch.stack([pipeline(image) for image in as_floats(images) for _ in range(repeats)])
    ours = make_augmenter(**EVERYTHING_ON)(images.repeat_interleave(repeats, dim=0), torch.Generator().manual_seed(11))
    reference, ours = view_features(reference, repeats), view_features(ours, repeats)
    # Per image, the difference of the features' mean and spread over its views; images are independent
    # units, so a paired t statistic (63 degrees of freedom) tests each difference against 0. |t| < 5
    # fails a correct implementation with probability ~5e-6 per statistic (1e-4 for all 16); it still
    # catches e.g. grayscale p 0.3 for 0.2, jitter p 0.5 for 0.8 or brightness 0.6 for 0.4 at t ~ 6.
    for statistic in (lambda features: features.mean(dim=1), lambda features: features.std(dim=1)):
        difference = statistic(reference) - statistic(ours)
        t = difference.mean(dim=0) / (difference.std(dim=0) / math.sqrt(len(images)))
        assert (t.abs() < 5).all(), t


def test_single_channel_images_match_replicated_rgb_views():
    gray_images = random_images(32, channels=1)
    augmenter_gray = make_augmenter(channels=1, **EVERYTHING_ON)
    augmenter_rgb = make_augmenter(channels=3, **EVERYTHING_ON)
    views, params = augmenter_gray(gray_images, torch.Generator().manual_seed(12), with_params=True)
    assert views.shape == (32, 1, 32, 32)
    rgb_views = augmenter_rgb.apply(gray_images.expand(-1, 3, -1, -1), params)
    assert torch.allclose(rgb_views, views.expand(-1, 3, -1, -1), atol=1e-5)


@pytest.mark.parametrize(("shape", "image_size"), [((8, 3, 48, 64), 24), ((8, 1, 8, 8), 16)])
def test_views_of_other_input_sizes_have_the_requested_size(shape, image_size):
    images = random_images(shape[0], channels=shape[1], size=64)[..., :shape[2], :shape[3]]
    augmenter = make_augmenter(channels=shape[1], image_size=image_size, **EVERYTHING_ON)
    views, params = augmenter(images, torch.Generator().manual_seed(13), with_params=True)
    assert views.shape == (shape[0], shape[1], image_size, image_size)
    assert views.min() >= 0 and views.max() <= 1
    assert torch.equal(params.crop[:, 2] * shape[2], (params.crop[:, 2] * shape[2]).round()), "input pixel grid"


@pytest.mark.parametrize(("image_size", "kernel_size"), [(8, 3), (32, 3), (64, 7), (96, 9), (224, 23)])
def test_default_blur_kernel_is_the_odd_size_nearest_a_tenth_of_the_image(image_size, kernel_size):
    assert make_augmenter(image_size=image_size).blur_kernel_size == kernel_size
    assert make_augmenter(image_size=image_size, blur={"kernel_size": 5}).blur_kernel_size == 5


def test_channel_stats_match_a_direct_float64_computation_in_chunks():
    images = random_images(50, size=8, seed=14)
    values = images.double() / 255.0
    for chunk_elements in (1, 200, 1 << 22):  # one image per chunk, a few images, everything at once
        mean, std = channel_stats(images, chunk_elements=chunk_elements)
        assert mean.dtype == torch.float64
        assert torch.allclose(mean, values.mean(dim=(0, 2, 3)), atol=1e-12)
        assert torch.allclose(std, values.std(dim=(0, 2, 3), unbiased=False), atol=1e-12)
    assert math.isclose(channel_stats(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8))[0].item(), 1.0)


def test_compiled_augmenter_gives_the_eager_views_without_recompiling_for_new_draws():
    """`train.compile` compiles `apply` into one graph (no graph break); one compilation must serve every
    step's fresh parameters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = make_augmenter(**EVERYTHING_ON)
    compiled = make_augmenter(**EVERYTHING_ON).compile()
    images = photo_patches()[:16]
    generator = torch.Generator().manual_seed(5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            params = eager.sample(16, generator, "cpu")
            torch.testing.assert_close(compiled.apply(images, params), eager.apply(images, params),
                                       atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_compiled_sampling_draws_the_eager_parameters_in_one_graph():
    """`compile` also compiles the parameters' computation from the step's one uniform draw: the same
    parameters as eager, one graph, no recompilation for new draws."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = make_augmenter(**EVERYTHING_ON)
    compiled = make_augmenter(**EVERYTHING_ON).compile()
    first, second = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            expected = eager.sample(16, first, "cpu", input_size=(40, 40)).as_vector()
            torch.testing.assert_close(compiled.sample(16, second, "cpu", input_size=(40, 40)).as_vector(), expected,
                                       atol=1e-6, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("config", [
    NOTHING_ON,
    {**EVERYTHING_ON, "blur": {"p": 0.0}},  # every CIFAR recipe: no blur
    {**EVERYTHING_ON, "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0}},
    {**EVERYTHING_ON, "grayscale": 0.0, "solarize": 0.0, "color_jitter": {"p": 0.0}},
    EVERYTHING_ON,
])
@pytest.mark.parametrize("channels", [1, 3])
def test_ops_that_cannot_act_are_skipped_without_changing_a_view(config, channels):
    """The fast path (ops with probability 0, or a hue range of 0, left out at build time) gives the
    reference path's views (every op applied) to 1e-6, and the same parameters."""
    images = photo_patches()[:16] if channels == 3 else photo_patches()[:16, :1]
    fast, reference = make_augmenter(channels, **config), make_augmenter(channels, **config).reference()
    views, params = fast(images, torch.Generator().manual_seed(3), with_params=True)
    expected, expected_params = reference(images, torch.Generator().manual_seed(3), with_params=True)
    assert torch.equal(params.as_vector(), expected_params.as_vector())
    assert (views - expected).abs().max() <= 1e-6


def test_every_jitter_order_gets_the_reference_rounds_views_with_one_hue_pass():
    """The fast jitter ("LLLHLLL": each sample's hue computed once) equals the reference's four rounds of every op
    ("LHLHLHLH": hue computed 4 times) for each of the 24 orders, to 1e-6; a pass string that cannot hold
    every order is refused."""
    import itertools

    from hssl_cli.data.augment import JITTER_PASSES, REFERENCE_JITTER_PASSES, pass_plan

    assert JITTER_PASSES.count("H") == 1 and REFERENCE_JITTER_PASSES.count("H") == 4
    orders = torch.tensor(list(itertools.permutations(range(4)))).repeat(2, 1)  # 48 samples
    images = photo_patches()[:48]
    params = ViewParams.identity(48, "cpu")
    params.jitter_applied = torch.arange(48) != 47  # one sample without jitter
    params.jitter_order = orders
    generator = torch.Generator().manual_seed(0)
    params.jitter_factors = torch.stack([0.3 + 1.4 * torch.rand(48, generator=generator) for _ in range(3)]
                                        + [torch.rand(48, generator=generator) - 0.5], dim=1)
    fast = make_augmenter(**EVERYTHING_ON).apply(images, params)
    reference = make_augmenter(**EVERYTHING_ON).reference().apply(images, params)
    assert (fast - reference).abs().max() <= 1e-6
    assert torch.equal(fast[47], as_floats(images[47]))
    plan = pass_plan(JITTER_PASSES)  # each row applies positions 0..3 in order, hue in an H pass
    for hue_at, row in enumerate(plan.tolist()):
        assert [position for position in row if position >= 0] == [0, 1, 2, 3]
        assert JITTER_PASSES[row.index(hue_at)] == "H"
    with pytest.raises(ValueError, match="cannot hold"):
        pass_plan("LLLHL")
