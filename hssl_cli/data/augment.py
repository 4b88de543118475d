"""Batched, per-sample random augmentation on the device; returns views and parameter vectors.

One `Augmenter` call draws every sample's parameters at once from a `torch.Generator` (`sample`) and
applies them with batched tensor ops (`apply`): random resized crop + horizontal flip (one
affine_grid/grid_sample), colour jitter in a per-sample random order, grayscale, Gaussian blur,
solarize, normalisation. The semantics follow torchvision's transforms (SimCLR/BYOL order); the
parameters form EquiMod's vector (`ViewParams.as_vector`, layout in `PARAM_NAMES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hssl_cli.recipe import AugmentConfig

PARAM_NAMES: tuple[str, ...] = (
    "crop_i", "crop_j", "crop_h", "crop_w", "flip", "jitter_applied",
    "jitter_order_0", "jitter_order_1", "jitter_order_2", "jitter_order_3",
    "brightness", "contrast", "saturation", "hue", "grayscale", "blur_applied", "blur_sigma", "solarize",
)  # fmt: skip

CROP_TRIES = 10
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma
IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors; hue shift
SOLARIZE_THRESHOLD = 0.5
# Colour-jitter passes: "L" one blend (brightness, contrast or saturation), "H" one hue shift. Every order of
# the four ops fits "LLLHLLL" with hue in its one H pass, so each sample's hue is computed once; the reference
# ("LHLHLHLH", four rounds of every op) computes it four times. Measured (eager, CPU, batch 512): 124 against
# 259 us/image; "LHLLHL" (two H passes) 166; the blend passes cost ~6 us/image each, a hue pass ~50.
JITTER_PASSES = "LLLHLLL"
REFERENCE_JITTER_PASSES = "LHLHLHLH"

# Columns of the single uniform draw per sample in `Augmenter.sample`.
_AREA, _LOG_RATIO = slice(0, CROP_TRIES), slice(CROP_TRIES, 2 * CROP_TRIES)
_TOP, _LEFT, _FLIP, _JITTER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(2 * CROP_TRIES, 2 * CROP_TRIES + 8)
_ORDER = slice(2 * CROP_TRIES + 8, 2 * CROP_TRIES + 12)
_FACTORS = slice(2 * CROP_TRIES + 12, 2 * CROP_TRIES + 16)
_NUM_DRAWS = 2 * CROP_TRIES + 16


def _normalize_unit_pixels(scaled: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel of pixels already scaled to [0, 1]."""
    return (scaled - mean.view(1, -1, 1, 1).to(scaled)) / std.view(1, -1, 1, 1).to(scaled)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""
    return _normalize_unit_pixels(images.float() / 255.0, mean, std)


@dataclass(eq=False)
class ViewParams:
    """One view's augmentation per row; tensors live on the images' device."""

    crop: torch.Tensor  # (B, 4) top, left, height, width as fractions of the input's H and W
    flip: torch.Tensor  # (B,) bool
    jitter_applied: torch.Tensor  # (B,) bool
    jitter_order: torch.Tensor  # (B, 4) long, op applied 1st..4th: 0 brightness, 1 contrast, 2 saturation, 3 hue
    jitter_factors: torch.Tensor  # (B, 4) brightness, contrast, saturation factors and hue shift
    grayscale: torch.Tensor  # (B,) bool
    blur_sigma: torch.Tensor  # (B,) float, 0 = no blur
    solarize: torch.Tensor  # (B,) bool

    def as_vector(self) -> torch.Tensor:
        """(B, 18) float32 in `PARAM_NAMES` order, raw (not standardised)."""
        columns = [
            self.crop, self.flip[:, None], self.jitter_applied[:, None], self.jitter_order,
            self.jitter_factors, self.grayscale[:, None], (self.blur_sigma > 0)[:, None],
            self.blur_sigma[:, None], self.solarize[:, None],
        ]  # fmt: skip
        return torch.cat([column.float() for column in columns], dim=1)

    def chunk(self, count: int) -> list[ViewParams]:
        """Split the rows into `count` equal parts (the views of one batched draw of `count` views)."""
        fields = [getattr(self, name).chunk(count) for name in self.__dataclass_fields__]
        return [ViewParams(*parts) for parts in zip(*fields, strict=True)]

    @classmethod
    def from_vector(cls, vector: torch.Tensor) -> ViewParams:
        """Inverse of `as_vector` (blur_applied is implied by blur_sigma > 0)."""
        if vector.ndim != 2 or vector.shape[1] != len(PARAM_NAMES):
            raise ValueError(f"expected a (B, {len(PARAM_NAMES)}) parameter vector, got {list(vector.shape)}")
        vector = vector.float()
        return cls(
            crop=vector[:, 0:4].clone(),
            flip=vector[:, 4] > 0.5,
            jitter_applied=vector[:, 5] > 0.5,
            jitter_order=vector[:, 6:10].round().long(),
            jitter_factors=vector[:, 10:14].clone(),
            grayscale=vector[:, 14] > 0.5,
            blur_sigma=vector[:, 16].clone(),
            solarize=vector[:, 17] > 0.5,
        )

    @classmethod
    def identity(cls, batch_size: int, device: torch.device | str = "cpu") -> ViewParams:
        """The full image, no flip, no jitter, no grayscale, no blur, no solarize."""
        no = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return cls(
            crop=torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).repeat(batch_size, 1),
            flip=no,
            jitter_applied=no.clone(),
            jitter_order=torch.arange(4, device=device).repeat(batch_size, 1),
            jitter_factors=torch.tensor(IDENTITY_JITTER, device=device).repeat(batch_size, 1),
            grayscale=no.clone(),
            blur_sigma=torch.zeros(batch_size, device=device),
            solarize=no.clone(),
        )


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) grayscale (a 1-channel image is its own luma)."""
    if images.shape[1] == 1:
        return images
    red, green, blue = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped to [0, 1]; factor is per sample."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images in [0, 1] by `shift` (fraction of a turn, per sample).

    With V = max(r, g, b) and chroma C = V - min(r, g, b) kept and the hue H in sextants [0, 6):
    H' = H + 6 shift, channel_n = V - C clamp(min(k_n, 4 - k_n), 0, 1), k_n = (H' + n) mod 6, n = 5, 3, 1.
    """
    red, green, blue = images.unbind(dim=1)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    # Gray pixels (chroma 0) have all differences 0, so any finite inverse gives them hue 0.
    inverse = 1 / chroma.clamp_min(1e-12)
    hue = torch.where(
        value == red,
        (green - blue) * inverse,
        torch.where(value == green, (blue - red) * inverse + 2, (red - green) * inverse + 4),
    )
    offsets = (5 - 2 * torch.arange(3, device=images.device, dtype=images.dtype)).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder((hue + 6 * shift.view(-1, 1, 1)).unsqueeze(1) + offsets, 6)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def pass_plan(passes: str) -> torch.Tensor:
    """(4, len(passes)) long: row h, for a sample whose hue is its h-th op, the position in its order that
    each pass applies (-1: none), matching the ops to the passes in order, each at the earliest fitting pass."""
    rows = []
    for hue_at in range(4):
        row, position = [], 0
        for kind in passes:
            fits = position < 4 and (kind == "H") == (position == hue_at)
            row.append(position if fits else -1)
            position += fits
        if position < 4:
            raise ValueError(f"jitter passes {passes!r} cannot hold an order with hue at position {hue_at}")
        rows.append(row)
    return torch.tensor(rows)


def _odd_kernel_size(image_size: int) -> int:
    """The odd integer nearest 10% of the image side, at least 3."""
    return max(3, 2 * round((0.1 * image_size - 1) / 2) + 1)


class Augmenter:
    """Samples per-sample augmentation parameters and applies them to a uint8 batch in one go."""

    def __init__(self, config: AugmentConfig, image_size: int, mean: torch.Tensor, std: torch.Tensor):
        self.config = config
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.blur_kernel_size = config.blur.kernel_size or _odd_kernel_size(image_size)
        jitter = config.color_jitter
        self._jitter_low = (max(0.0, 1 - jitter.brightness), max(0.0, 1 - jitter.contrast),
                            max(0.0, 1 - jitter.saturation), -jitter.hue)
        self._jitter_high = (1 + jitter.brightness, 1 + jitter.contrast, 1 + jitter.saturation, jitter.hue)
        # Ops that can never act are left out of `apply` at build time (issue 15: blur at p 0 cost a grouped
        # conv per view in every CIFAR recipe); `sample` still draws their columns, so the parameters, and
        # EquiMod's vectors, are those of the full pipeline. `reference()` keeps every op, for the tests.
        self.skip_inactive = True
        # Made beside the statistics, which live where the images are augmented: no copy per step.
        self._pass_plans = {passes: pass_plan(passes).to(mean.device)
                            for passes in (JITTER_PASSES, REFERENCE_JITTER_PASSES)}
        self.output_dtype, self.channels_last = torch.float32, False  # set_output: what the model reads on CUDA
        self._active = {
            "jitter": jitter.p > 0 and any(v > 0 for v in (jitter.brightness, jitter.contrast, jitter.saturation,
                                                           jitter.hue)),
            "hue": jitter.p > 0 and jitter.hue > 0,
            "grayscale": config.grayscale > 0,
            "blur": config.blur.p > 0,
            "solarize": config.solarize > 0,
        }

    def set_output(self, dtype: torch.dtype, channels_last: bool) -> Augmenter:
        """Views made in `dtype` and memory layout inside `apply` (so a compiled apply fuses the cast): bf16
        channels_last on CUDA under bf16 autocast, what the convolutions read anyway."""
        self.output_dtype, self.channels_last = dtype, channels_last
        return self

    def reference(self) -> Augmenter:
        """This augmenter with every op applied, active or not: the path the fast one must equal."""
        self.skip_inactive = False
        return self

    def _runs(self, op: str) -> bool:
        return self._active[op] or not self.skip_inactive

    def compile(self) -> Augmenter:
        """torch.compile both stages: `apply` (the per-pixel work: crop, jitter, blur, normalisation fuse into
        few kernels) and `params_from_uniform` (the ~170 tiny ops that turn `sample`'s one random draw into
        parameters). The draw itself stays eager (it reads the step's generator). Shapes are static, so one
        compilation of each serves a whole run."""
        self.apply = torch.compile(self.apply, dynamic=False)
        self.params_from_uniform = torch.compile(self.params_from_uniform, dynamic=False)
        return self

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, with_params: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ViewParams]:
        """Random views of uint8 (B, C, H, W) images; with_params also returns what was drawn."""
        params = self.sample(images.shape[0], generator, images.device, input_size=tuple(images.shape[-2:]))
        views = self.apply(images, params)
        return (views, params) if with_params else views

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str,
        input_size: tuple[int, int] | None = None,
    ) -> ViewParams:
        """Draw every sample's parameters from `generator` (one uniform draw of (B, 36)).

        input_size (H, W) of the images to crop, default (image_size, image_size): crop boxes are
        whole pixels of that grid, as in torchvision's RandomResizedCrop.
        """
        uniform = torch.rand(batch_size, _NUM_DRAWS, generator=generator, device=device)
        return self.params_from_uniform(uniform, *(input_size or (self.image_size, self.image_size)))

    def params_from_uniform(self, uniform: torch.Tensor, height: int, width: int) -> ViewParams:
        """The parameters that one (B, 36) uniform draw stands for: a pure function, compiled with `compile`."""
        config = self.config
        batch_size, device = uniform.shape[0], uniform.device
        crop = self._sample_crops(uniform, height, width)
        jitter_applied = uniform[:, _JITTER] < config.color_jitter.p
        # Without jitter, order and factors carry no information: canonical values keep that noise
        # out of EquiMod's parameter encoder. Python scalars, not host tensors: no copy, no GPU sync.
        factors = torch.stack([
            torch.where(jitter_applied, low + (high - low) * uniform[:, column], identity)
            for column, low, high, identity in zip(range(_FACTORS.start, _FACTORS.stop), self._jitter_low,
                                                   self._jitter_high, IDENTITY_JITTER, strict=True)
        ], dim=1)  # fmt: skip
        order = torch.where(jitter_applied[:, None], uniform[:, _ORDER].argsort(dim=1),
                            torch.arange(4, device=device).expand(batch_size, 4))
        blur_applied = uniform[:, _BLUR] < config.blur.p
        sigma_low, sigma_high = config.blur.sigma
        sigma = sigma_low + (sigma_high - sigma_low) * uniform[:, _SIGMA]
        return ViewParams(
            crop=crop,
            flip=uniform[:, _FLIP] < config.flip,
            jitter_applied=jitter_applied,
            jitter_order=order,
            jitter_factors=factors,
            grayscale=uniform[:, _GRAY] < config.grayscale,
            blur_sigma=torch.where(blur_applied, sigma, torch.zeros_like(sigma)),
            solarize=uniform[:, _SOLARIZE] < config.solarize,
        )

    def _sample_crops(self, uniform: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """RandomResizedCrop's box per sample: the first of CROP_TRIES candidates that fits, else central."""
        (scale_low, scale_high), (ratio_low, ratio_high) = self.config.crop_scale, self.config.crop_ratio
        area = height * width * (scale_low + (scale_high - scale_low) * uniform[:, _AREA])
        log_low, log_high = math.log(ratio_low), math.log(ratio_high)
        aspect = (log_low + (log_high - log_low) * uniform[:, _LOG_RATIO]).exp()
        crop_w = (area * aspect).sqrt().round()
        crop_h = (area / aspect).sqrt().round()
        fits = (crop_w >= 1) & (crop_w <= width) & (crop_h >= 1) & (crop_h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
        found = fits.any(dim=1)
        fallback_h, fallback_w = self._central_crop(height, width)
        crop_h = torch.where(found, crop_h.gather(1, first).squeeze(1), fallback_h)
        crop_w = torch.where(found, crop_w.gather(1, first).squeeze(1), fallback_w)
        # floor(u * (n + 1)) is randint(0, n); the clamp guards u * (n + 1) rounding up to n + 1.
        top = torch.minimum((uniform[:, _TOP] * (height - crop_h + 1)).floor(), height - crop_h)
        left = torch.minimum((uniform[:, _LEFT] * (width - crop_w + 1)).floor(), width - crop_w)
        top = torch.where(found, top, ((height - crop_h) / 2).floor())
        left = torch.where(found, left, ((width - crop_w) / 2).floor())
        return torch.stack([top / height, left / width, crop_h / height, crop_w / width], dim=1)

    def _central_crop(self, height: int, width: int) -> tuple[float, float]:
        """Whole image, cut to the nearest allowed aspect ratio (torchvision's fallback)."""
        ratio_low, ratio_high = self.config.crop_ratio
        if width / height < ratio_low:
            return float(round(width / ratio_low)), float(width)
        if width / height > ratio_high:
            return float(height), float(round(height * ratio_high))
        return float(height), float(width)

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, C, S, S) normalised views; a pure function of its inputs. Ops the
        config never draws are skipped: to apply parameters from elsewhere, use `reference()`."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 (B, 1|3, H, W) images, got {images.dtype} {list(images.shape)}")
        views = self._crop_and_flip(images.float() / 255.0, params)
        if self._runs("jitter"):
            views = self._color_jitter(views, params)
        if views.shape[1] == 3 and self._runs("grayscale"):
            gray = _luma(views).expand_as(views)
            views = torch.where(params.grayscale.view(-1, 1, 1, 1), gray, views)
        if self._runs("blur"):
            views = self._blur(views, params.blur_sigma)
        if self._runs("solarize"):
            solarized = params.solarize.view(-1, 1, 1, 1) & (views >= SOLARIZE_THRESHOLD)
            views = torch.where(solarized, 1 - views, views)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return _normalize_unit_pixels(views, self.mean, self.std).to(dtype=self.output_dtype, memory_format=layout)

    def _crop_and_flip(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Resample each crop box to image_size with one affine grid; a flip negates the x scale."""
        batch, channels, height, width = images.shape
        top, left, crop_h, crop_w = params.crop.to(images).unbind(dim=1)
        sign = 1 - 2 * params.flip.to(images)
        zero = torch.zeros_like(top)
        # Normalised coordinates in [-1, 1] span pixel edges (align_corners=False), so a box edge
        # at fraction t sits at 2t - 1 and the full box with H == image_size is the identity.
        theta = torch.stack([
            torch.stack([crop_w * sign, zero, 2 * left + crop_w - 1], dim=1),
            torch.stack([zero, crop_h, 2 * top + crop_h - 1], dim=1),
        ], dim=1)  # fmt: skip
        size = self.image_size
        grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
        # Clamp to the box's outer pixel centres: upsampling then repeats edge pixels instead of
        # blending in pixels outside the crop, exactly like crop-then-resize.
        low = torch.stack([2 * left - 1 + 1 / width, 2 * top - 1 + 1 / height], dim=1)
        high = torch.stack([2 * (left + crop_w) - 1 - 1 / width, 2 * (top + crop_h) - 1 - 1 / height], dim=1)
        grid = torch.minimum(torch.maximum(grid, low.view(-1, 1, 1, 2)), high.view(-1, 1, 1, 2))
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _color_jitter(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Each sample's four ops in its own order, as a fixed sequence of passes that each compute one op.

        torchvision's ColorJitter: brightness, contrast and saturation are x -> f x + (1 - f) t with the
        target t black, the image's mean luma, the pixel's luma; hue shifts in HSV; each clamps to
        [0, 1]. One blend pass ("L") serves all three; a hue pass ("H") shifts the samples whose hue falls
        there. `_jitter_passes` maps each sample's order onto the passes; skipped passes act as the identity
        (factor 1 leaves values exact).
        """
        brightness, contrast, saturation, hue = params.jitter_factors.to(images).unbind(dim=1)
        one = torch.ones_like(brightness)
        rgb = images.shape[1] == 3
        if not rgb:  # saturation and hue do nothing to a 1-channel image (as in torchvision)
            saturation = one
        if rgb and self._runs("hue"):
            passes = JITTER_PASSES if self.skip_inactive else REFERENCE_JITTER_PASSES
            ops = self._jitter_passes(params, passes)
        else:  # hue range 0 (every shift is 0) or one channel: four blend rounds, hue's round the identity
            passes, ops = "LLLL", torch.where(params.jitter_applied[:, None], params.jitter_order, -1)
        for index, kind in enumerate(passes):
            op = ops[:, index]
            if kind == "H":
                images = torch.where((op == 3).view(-1, 1, 1, 1), _shift_hue(images, hue), images)
            else:
                factor = torch.where(op == 0, brightness, torch.where(op == 1, contrast,
                                                                      torch.where(op == 2, saturation, one)))
                luma = _luma(images)
                mean_luma = luma.mean(dim=(1, 2, 3), keepdim=True) * (op == 1).view(-1, 1, 1, 1)
                target = torch.where((op == 2).view(-1, 1, 1, 1), luma, mean_luma)
                images = _blend(images, target, factor)
        return images

    def _jitter_passes(self, params: ViewParams, passes: str) -> torch.Tensor:
        """(B, len(passes)) long: the op each sample applies in each pass, -1 for none (or no jitter)."""
        hue_at = (params.jitter_order == 3).int().argmax(dim=1)
        positions = self._pass_plans[passes].to(hue_at.device)[hue_at]
        ops = params.jitter_order.gather(1, positions.clamp_min(0))
        return torch.where((positions >= 0) & params.jitter_applied[:, None], ops, -1)

    def _blur(self, images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample separable Gaussian blur (grouped conv2d, reflect padding); sigma 0 leaves a sample."""
        batch, channels, height, width = images.shape
        radius = self.blur_kernel_size // 2
        offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
        sigma = sigma.to(images)
        # Clamped sigma keeps sigma = 0 rows finite; those samples are restored by the where below.
        kernel = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-3)[:, None]).square())
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
        flat = F.pad(images.reshape(1, batch * channels, height, width), [radius] * 4, mode="reflect")
        flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
        flat = F.conv2d(flat, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
        return torch.where((sigma > 0).view(-1, 1, 1, 1), flat.view_as(images), images)
