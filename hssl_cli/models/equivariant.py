"""Equivariant backbones over C_N / D_N acting on R^2 (escnn), and their structure-removed twins.

Every hidden map is made of regular fields: C fields of |G| channels each (field-major), so a
network f satisfies f(T_g x) = L_g f(x) with (L_g z)_h = z_{g^-1 h} (actions in data/groups.py).
The input (trivial fields) is masked to its inscribed disk, lifted by a steerable convolution, and
downsampled by a blur followed by a grid-centred subsampling (2x2 mean on even sizes, every other
pixel on odd sizes), so that rotations by 90 degrees and flips commute with every layer on any image
size; a strided convolution on an even grid would not. Outputs: the lifted features (B, |G|, C)
after spatial mean pooling, and their max over the group, the invariant features (B, C).

escnn is imported only here, when an equivariant layer is built; GeometricTensors never leave a
layer, so callers see plain tensors. `export()` swaps every escnn layer for escnn's own export (plain
Conv2d / BatchNorm2d). `plain=True` builds the same layout with ordinary layers and |G| C channels:
the "structure removed" ablation, whose channels are split into |G| pseudo-fibres.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from hssl_cli.data.groups import Group, disk_mask
from hssl_cli.models.capabilities import BackboneCapabilities

DEFAULT_WIDTHS = {"e2_convnet": (16, 32, 64), "e2_resnet18": (16, 32, 64, 128)}  # regular fields per stage


def import_escnn():
    """escnn takes seconds to import, so only equivariant layers pay for it."""
    import escnn.group._numerical as numerical

    # escnn 1.0.11 hands np.matrix to scikit-learn's randomized_svd, which recent scikit-learn rejects
    # (building D_N kernel bases fails); without it escnn falls back to scipy's exact SVD.
    numerical.randomized_svd = None
    import escnn

    return escnn


class OnTensors(nn.Module):
    """Runs an escnn module on plain tensors: wraps the input as its field type, unwraps the output."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        from escnn.nn import GeometricTensor

        return self.module(GeometricTensor(maps, self.module.in_type)).tensor


class LayerFactory:
    """Convolutions and batch norms between regular fields of `group`; ordinary layers of the same
    channel counts when `plain` (the structure-removed twin)."""

    def __init__(self, group: Group, plain: bool):
        self.group, self.plain = group, plain
        if not plain:
            escnn = import_escnn()
            space = escnn.gspaces.rot2dOnR2 if group.kind == "C" else escnn.gspaces.flipRot2dOnR2
            self.gspace = space(N=group.order)
            self.escnn = escnn

    def _field_type(self, fields: int, trivial: bool):
        representation = self.gspace.trivial_repr if trivial else self.gspace.regular_repr
        return self.escnn.nn.FieldType(self.gspace, fields * [representation])

    def conv(self, in_fields: int, out_fields: int, kernel_size: int, trivial_input: bool = False) -> nn.Module:
        """kernel_size x kernel_size convolution, zero padding that keeps the size, no bias (a BN follows)."""
        in_channels = in_fields if trivial_input else in_fields * self.group.size
        if self.plain:
            return nn.Conv2d(in_channels, out_fields * self.group.size, kernel_size, padding=kernel_size // 2,
                             bias=False)
        conv = self._r2conv(in_fields, out_fields, kernel_size, trivial_input)
        unit_std = self._unit_he_std(kernel_size, trivial_input)
        # generalized He: std_w = 1 / sqrt(#input irrep types of w's output irrep * #basis elements from
        # w's input irrep type into it). With one representation pair per layer the second count is
        # in_fields times that of a one-field-to-one-field layer, and weights run over (out field, in
        # field, basis element): so std = unit std / sqrt(in_fields), tiled. Equal to escnn's own values
        # (tests), but without its Python loop over every weight, which takes ~15 s for a C8 ResNet-18.
        std = unit_std.repeat(out_fields * in_fields) / math.sqrt(in_fields)
        conv.weights.data.copy_(std * torch.randn_like(conv.weights))
        return OnTensors(conv)

    def _r2conv(self, in_fields: int, out_fields: int, kernel_size: int, trivial_input: bool) -> nn.Module:
        return self.escnn.nn.R2Conv(self._field_type(in_fields, trivial_input), self._field_type(out_fields, False),
                                    kernel_size, padding=kernel_size // 2, bias=False, initialize=False)

    def _unit_he_std(self, kernel_size: int, trivial_input: bool) -> torch.Tensor:
        """escnn's cached He initialisation of the one-field-to-one-field layer: its per-weight std."""
        unit = self._r2conv(1, 1, kernel_size, trivial_input)
        init = self.escnn.nn.init
        init.generalized_he_init(unit.weights.data, unit.basisexpansion, cache=True)
        return init.cached_he_vars[unit.basisexpansion]

    def batch_norm(self, fields: int) -> nn.Module:
        if self.plain:
            return nn.BatchNorm2d(fields * self.group.size)
        return OnTensors(self.escnn.nn.InnerBatchNorm(self._field_type(fields, False)))

    def conv_bn_relu(self, in_fields: int, out_fields: int, kernel_size: int, trivial_input: bool = False,
                     downsample: bool = False) -> nn.Sequential:
        layers = [Downsample()] if downsample else []
        layers += [self.conv(in_fields, out_fields, kernel_size, trivial_input), self.batch_norm(out_fields),
                   nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)


class Downsample(nn.Module):
    """Binomial 3x3 blur, then halve the grid keeping it centred: mean of 2x2 blocks on an even side,
    every other pixel from the first on an odd side. Commutes exactly with rot90 and flips; acts on
    each channel alike, so it commutes with the fibre permutations too."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        taps = maps.new_tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :] / 16).expand(maps.shape[1], 1, 3, 3)
        blurred = F.conv2d(maps, kernel, padding=1, groups=maps.shape[1])
        if maps.shape[-1] % 2 == 0:
            return F.avg_pool2d(blurred, 2)
        return blurred[..., ::2, ::2]


class BasicBlock(nn.Module):
    """ResNet basic block on regular fields: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), with the
    downsampling (when any) applied first to both branches."""

    def __init__(self, layers: LayerFactory, in_fields: int, out_fields: int, downsample: bool):
        super().__init__()
        self.downsample = Downsample() if downsample else nn.Identity()
        self.main = nn.Sequential(layers.conv(in_fields, out_fields, 3), layers.batch_norm(out_fields),
                                  nn.ReLU(inplace=True), layers.conv(out_fields, out_fields, 3),
                                  layers.batch_norm(out_fields))
        self.shortcut = (nn.Identity() if in_fields == out_fields else
                         nn.Sequential(layers.conv(in_fields, out_fields, 1), layers.batch_norm(out_fields)))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        maps = self.downsample(maps)
        return F.relu(self.main(maps) + self.shortcut(maps))


def _convnet_stages(layers: LayerFactory, in_channels: int, widths: tuple[int, ...]) -> dict[str, nn.Module]:
    """Lifting 5x5 conv, then per further width: downsample, 3x3 conv; each with BN and ReLU."""
    stages = {"lift": layers.conv_bn_relu(in_channels, widths[0], 5, trivial_input=True)}
    for index in range(1, len(widths)):
        stages[f"conv{index + 1}"] = layers.conv_bn_relu(widths[index - 1], widths[index], 3, downsample=True)
    return stages


def _resnet18_stages(layers: LayerFactory, in_channels: int, widths: tuple[int, ...]) -> dict[str, nn.Module]:
    """CIFAR-style ResNet-18: 3x3 lifting stem, four stages of two basic blocks, downsampling at 2-4."""
    stages = {"stem": layers.conv_bn_relu(in_channels, widths[0], 3, trivial_input=True)}
    previous = widths[0]
    for stage, width in enumerate(widths, start=1):
        for block in range(2):
            stages[f"layer{stage}_{block}"] = BasicBlock(layers, previous, width, downsample=stage > 1 and block == 0)
            previous = width
    return stages


class EquivariantBackbone(nn.Module):
    """Image batch (B, in_channels, H, W) -> invariant features (B, feature_dim); `lifted` gives the
    (B, |G|, feature_dim) fibres, `layer_outputs` every stage's map for equivariance checks."""

    def __init__(self, stages: dict[str, nn.Module], group: Group, fields: int, equivariant: bool):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.group = group
        self.feature_dim = fields
        # lifted fibres of its group and every stage's map, equivariant unless it is the structure-removed twin;
        # no library model has its layout (hssl export --format plain only)
        self.capabilities = BackboneCapabilities(group=group, equivariant=equivariant, spatial_map="layer_outputs")
        self._drop_derived_buffers()
        self.register_load_state_dict_post_hook(_refresh_cached_filters)

    def layer_outputs(self, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """[(stage name, map (B, C_l |G|, H_l, W_l))] in order; the first entry is the masked input."""
        maps = images * disk_mask(images.shape[-1], images.device).to(images.dtype)
        outputs = [("input", maps)]
        for name, stage in self.stages.items():
            maps = stage(maps)
            outputs.append((name, maps))
        return outputs

    def lifted(self, images: torch.Tensor) -> torch.Tensor:
        """z(x): (B, |G|, C), z[:, h] the fibre of group element h, after spatial mean pooling."""
        maps = self.layer_outputs(images)[-1][1]
        pooled = maps.mean(dim=(2, 3))
        return pooled.view(len(pooled), self.feature_dim, self.group.size).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.lifted(images).amax(dim=1)  # group max pooling: invariant when f is equivariant

    def train(self, mode: bool = True) -> EquivariantBackbone:
        super().train(mode)  # escnn convolutions cache their expanded filters as buffers in eval mode
        self._drop_derived_buffers()
        return self

    def _drop_derived_buffers(self) -> None:
        """escnn's buffers (sampled bases, indices, cached filters) follow from the architecture and the
        weights; keeping them out of state_dict makes checkpoints small and independent of train/eval."""
        for module in self.modules():
            if type(module).__module__.startswith("escnn."):
                module._non_persistent_buffers_set.update(module._buffers)

    def export(self) -> EquivariantBackbone:
        """A copy in eval mode whose escnn layers are replaced by escnn's plain-PyTorch export."""
        training = self.training
        # in eval mode escnn caches filters that carry autograd history, which deepcopy refuses
        exported = copy.deepcopy(self.train()).eval()
        self.train(training)
        _replace_wrapped(exported)
        return exported


def _replace_wrapped(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, OnTensors):
            setattr(module, name, child.module.export())
        else:
            _replace_wrapped(child)


def _refresh_cached_filters(module: nn.Module, incompatible_keys) -> None:
    """Loading weights into an eval-mode escnn model would leave stale cached filters: rebuild them."""
    if not module.training:
        module.train()
        module.eval()


def build_equivariant_backbone(backbone: str, group: Group, in_channels: int, widths: tuple[int, ...] | None = None,
                               plain: bool = False) -> EquivariantBackbone:
    """`backbone`: e2_convnet | e2_resnet18; widths in regular fields per stage (default DEFAULT_WIDTHS)."""
    widths = tuple(widths or DEFAULT_WIDTHS[backbone])
    layers = LayerFactory(group, plain)
    build = {"e2_convnet": _convnet_stages, "e2_resnet18": _resnet18_stages}[backbone]
    return EquivariantBackbone(build(layers, in_channels, widths), group, widths[-1], equivariant=not plain)
