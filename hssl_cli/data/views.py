"""Per-view pipelines: the recipe's views (`Recipe.resolved_views`) as augmenters, and the `Views` a
method receives each step. Each view spec is drawn in one batched call, whatever its count."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hssl_cli.data.augment import Augmenter, ViewParams, normalize
from hssl_cli.recipe import Recipe


@dataclass(eq=False)
class Views:
    """One step's input to a method: the global views every loss pairs, the local (multi-crop) views, the
    augmentation parameters of each, and the un-augmented normalised batch x0 when the method reads it."""

    global_views: list[torch.Tensor]
    global_params: list[ViewParams]
    local_views: list[torch.Tensor] = field(default_factory=list)
    local_params: list[ViewParams] = field(default_factory=list)
    original: torch.Tensor | None = None


class ViewPipeline:
    """`count` views of `size` pixels with one augmentation distribution."""

    def __init__(self, augmenter: Augmenter, count: int, role: str):
        self.augmenter, self.count, self.role = augmenter, count, role

    def draw(self, images: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], list[ViewParams]]:
        """uint8 (B, C, H, W) -> `count` views (B, C, size, size) and their parameters, in one call."""
        batch = images if self.count == 1 else images.repeat(self.count, 1, 1, 1)
        views, params = self.augmenter(batch, generator, with_params=True)
        return list(views.chunk(self.count)), params.chunk(self.count)


def build_pipelines(recipe: Recipe, mean: torch.Tensor, std: torch.Tensor, device_type: str = "cpu",
                    bf16: bool = False) -> list[ViewPipeline]:
    """The recipe's views, in order; mean and std (per channel, [0, 1] units) normalise every view. On CUDA
    the views come out channels_last, in bf16 when the step runs under bf16 autocast."""
    pipelines = [ViewPipeline(Augmenter(view.augment, view.size, mean, std), view.count, view.role)
                 for view in recipe.resolved_views()]
    if device_type == "cuda":
        for pipeline in pipelines:
            pipeline.augmenter.set_output(torch.bfloat16 if bf16 else torch.float32, channels_last=True)
    return pipelines


def draw_views(pipelines: list[ViewPipeline], images: torch.Tensor, generator: torch.Generator,
               with_original: bool, mean: torch.Tensor, std: torch.Tensor) -> Views:
    """Every pipeline's views of a uint8 batch, in order, from one generator; x0 when asked for."""
    views = Views([], [])
    memory_format = torch.channels_last if images.is_cuda else torch.contiguous_format
    for pipeline in pipelines:
        drawn, params = pipeline.draw(images, generator)
        drawn = [view.contiguous(memory_format=memory_format) for view in drawn]
        if pipeline.role == "global":
            views.global_views += drawn
            views.global_params += params
        else:
            views.local_views += drawn
            views.local_params += params
    if with_original:
        first = next((pipeline.augmenter for pipeline in pipelines if pipeline.role == "global"), None)
        if first is not None and first.image_size != images.shape[-1]:
            # views smaller than the stored images (224 of 256 px): x0 is the whole image at the views' size,
            # the view with identity parameters (crop = the image, nothing else), as EquiMod's vectors say
            views.original = first.apply(images, ViewParams.identity(len(images), images.device))
        else:
            views.original = normalize(images, mean, std)
        if first is not None:  # x0 in the views' dtype and layout
            layout = torch.channels_last if first.channels_last else torch.contiguous_format
            views.original = views.original.to(dtype=first.output_dtype, memory_format=layout)
    return views
