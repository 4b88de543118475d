"""A vision transformer (`model.backbone: vit`, sized by model.vit): timm's VisionTransformer built for the
recipe's image size, classifier removed. It takes views of any multiple of the patch size (timm's
dynamic_img_size: absolute position embeddings are resampled, as DINO does for its local crops).

Its token grid is where H-SSL finds position fibres on a transformer (models/spatial.py): the patch tokens of a
block, the class token left out, as a map (B, D, h, w). Without position embeddings every layer acts on each
token alike or, in attention, on the set of tokens, so a shift of the image by whole patches permutes the
tokens: cyclically exact; with absolute position embeddings a token also says where it is, so nothing is
promised (capabilities.position_embedding)."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.models.capabilities import BackboneCapabilities
from hssl_cli.recipe import ViTConfig


def timm_arguments(config: ViTConfig, in_channels: int, image_size: int) -> dict:
    """timm's VisionTransformer(**these) is this backbone (hssl export writes them, so the library rebuilds it)."""
    return {"img_size": image_size, "patch_size": config.patch_size, "in_chans": in_channels, "num_classes": 0,
            "embed_dim": config.width, "depth": config.depth, "num_heads": config.heads, "class_token": True,
            "global_pool": config.pool, "pos_embed": "learn" if config.position_embedding == "absolute" else "none",
            "dynamic_img_size": True}


def vision_transformer(config: ViTConfig, in_channels: int, image_size: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    network = VisionTransformer(**timm_arguments(config, in_channels, image_size))
    network.feature_dim = config.width
    network.capabilities = BackboneCapabilities(spatial_map="token_grid", library_twins=("timm",),
                                                library_classifier=("head",),  # timm's ViT weights carry it
                                                position_embedding=config.position_embedding == "absolute")
    return network


def token_grid(network: nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    """The patch tokens after block `block` (0-based, -1 the last), without the class token: (B, D, h, w)."""
    (tokens,) = network.forward_intermediates(images, indices=[block % len(network.blocks)], output_fmt="NCHW",
                                              intermediates_only=True)
    return tokens


def after_block(network: nn.Module, block: int) -> list[nn.Module]:
    """What reads the tokens after block `block` (the later blocks, the final norms): nothing a loss on that
    block's token grid trains."""
    return [*network.blocks[block % len(network.blocks) + 1:], network.norm, network.fc_norm]
