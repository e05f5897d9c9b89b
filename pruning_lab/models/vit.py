"""Vision transformers from timm: ViT-Tiny (teacher) and a 6-layer ViT (student)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .registry import register_model

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


def feature_blocks(depth: int) -> list[int]:
    """The (up to) 4 spread-out blocks whose outputs are the features of a ViT of `depth` blocks."""
    return sorted({max(0, round((i + 1) * depth / 4) - 1) for i in range(4)})


class ViT(nn.Module):
    """A timm VisionTransformer returning (logits, features): patch tokens [B, N, D] of 4 spread-out blocks."""

    def __init__(self, vit: VisionTransformer, image_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.image_size = image_size
        self.feature_blocks = feature_blocks(len(vit.blocks))
        self.feature_widths = [vit.embed_dim] * len(self.feature_blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        final, features = self.vit.forward_intermediates(x, indices=self.feature_blocks, output_fmt="NLC")
        return self.vit.forward_head(final), features


def _vit(depth: int, num_classes: int, in_chans: int, image_size: int, patch_size: int, embed_dim: int,
         num_heads: int, drop_path_rate: float) -> ViT:
    # Imported here: timm's import (0.8 s) is paid only by commands that build a ViT.
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                            embed_dim=embed_dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path_rate)
    return ViT(vit, image_size)


@register_model("vit")
def vit_tiny(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, patch_size: int = 4,
             embed_dim: int = 192, depth: int = 12, num_heads: int = 3, drop_path_rate: float = 0.1,
             pretrained: bool = False) -> ViT:
    """ViT-Tiny: 12 layers, 192 dim, 3 heads; patch 4 on 32x32, or timm's ImageNet weights at 224."""
    if pretrained:
        # Needs the weights from the Hugging Face hub (a cluster login node); inputs are resized to 224.
        import timm

        vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=num_classes,
                                in_chans=in_chans, drop_path_rate=drop_path_rate)
        return ViT(vit, 224)
    return _vit(depth, num_classes, in_chans, image_size, patch_size, embed_dim, num_heads, drop_path_rate)


@register_model("vit")
def vit_student(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, patch_size: int = 4,
                embed_dim: int = 192, depth: int = 6, num_heads: int = 3, drop_path_rate: float = 0.0) -> ViT:
    """The ViT student: 6 layers, 192 dim, 3 heads, patch 4."""
    return _vit(depth, num_classes, in_chans, image_size, patch_size, embed_dim, num_heads, drop_path_rate)
