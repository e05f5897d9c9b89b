"""CIFAR-style ResNets: 3x3 stem with stride 1 and no max-pool, torchvision's BasicBlock."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    # Imported here: torchvision's import (1.5 s, most of it torch._dynamo) is paid only by commands that build a CNN.
    from torchvision.models.resnet import BasicBlock

    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(in_planes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet for small images; features are the outputs of the four stages."""

    def __init__(self, blocks: list[int], num_classes: int = 10, in_chans: int = 3, width: int = 64) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.feature_widths = widths
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        in_planes, stages = width, []
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            stages.append(_stage(in_planes, planes, n, 1 if i == 0 else 2))
            in_planes = planes
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the four stages."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.forward_features(x)
        return self.forward_head(features[-1]), features


@register_model("cnn")
def resnet18(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, width: int = 64) -> CifarResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); the CNN teacher."""
    return CifarResNet([2, 2, 2, 2], num_classes, in_chans, width)


@register_model("cnn")
def resnet8(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, width: int = 64) -> CifarResNet:
    """ResNet-8 (BasicBlock, [1, 1, 1, 1]); the CNN student."""
    return CifarResNet([1, 1, 1, 1], num_classes, in_chans, width)
