"""A scale-equivariant backbone by multi-scale lifting: one CNN f, shared weights, run on every level of a
scale pyramid, z_k(x) = pool f(S^k x) for k < K (data/scales.py: S halves the image by average pooling).
Then z_k(S^j x) = z_(k+j)(x) exactly, so the K levels are H-SSL's scale fibres, and the pooled features,
max_k z_k(x), are what a probe reads (scale pooling, as group pooling for rotations).

`plain=True` builds the structure-removed twin: K unshared copies of f, all on the full-size image, so
fibre k is no scaled view of the input (the analogue of the plain twin of an e2_* backbone)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hssl_cli.data.scales import downscale
from hssl_cli.models.capabilities import BackboneCapabilities, capabilities_of


class ScaleLiftedBackbone(nn.Module):
    def __init__(self, base: nn.Module, levels: int, plain: bool = False):
        super().__init__()
        copies = [base] + [copy.deepcopy(base) for _ in range(levels - 1)] if plain else [base]
        if plain:
            for network in copies[1:]:  # re-initialise: K independent networks, not K equal ones
                for module in network.modules():
                    # torch has no re-initialisation interface, only its layers' reset_parameters convention,
                    # which library layers (timm's) follow: any layer of any library CNN may have one
                    if hasattr(module, "reset_parameters") and module is not network:
                        module.reset_parameters()
        self.bases = nn.ModuleList(copies)
        self.levels, self.plain = levels, plain
        self.feature_dim = base.feature_dim
        # its K levels as lifted fibres, the full-size level's map where the CNN has one; no library model lifts
        # scales (hssl export --format plain only)
        has_map = capabilities_of(base).spatial_map is not None
        self.capabilities = BackboneCapabilities(scale_levels=levels, equivariant=not plain,
                                                 spatial_map="full_size_level" if has_map else None)

    def level_input(self, images: torch.Tensor, level: int) -> torch.Tensor:
        return images if self.plain else downscale(images, level)

    def network(self, level: int) -> nn.Module:
        return self.bases[level if self.plain else 0]

    def lifted(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, C): fibre k is the pooled features of level k."""
        return torch.stack([self.network(k)(self.level_input(images, k)) for k in range(self.levels)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.lifted(images).amax(dim=1)

    def stage_outputs(self, images: torch.Tensor, level: int) -> list[tuple[str, torch.Tensor]]:
        """The spatial maps of level `level`'s network, stage by stage (its top-level children; a Sequential
        child's own children), for the per-layer scale check."""
        network, outputs, handles = self.network(level), [], []
        stages = []
        for name, child in network.named_children():
            stages += [(f"{name}.{n}", c) for n, c in child.named_children()] if isinstance(child, nn.Sequential) \
                else [(name, child)]
        def keep(name: str):  # a copy: the next in-place ReLU would overwrite a BatchNorm's output
            return lambda _module, _inputs, output: outputs.append((name, output.clone())) \
                if isinstance(output, torch.Tensor) and output.ndim == 4 else None

        for name, child in stages:
            handles.append(child.register_forward_hook(keep(name)))
        try:
            network(self.level_input(images, level))
        finally:
            for handle in handles:
                handle.remove()
        return outputs
