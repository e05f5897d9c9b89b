"""The MNIST MLP of the CLOS experiment (784 -> 784 -> 256 -> 10)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


class MLP(nn.Module):
    """Flatten, then fc1 -> ReLU -> fc2 -> ReLU -> fc3; features are the two hidden activations."""

    def __init__(self, in_features: int, hidden: tuple, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.feature_widths = list(hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h1 = torch.relu(self.fc1(x.flatten(1)))
        h2 = torch.relu(self.fc2(h1))
        return self.fc3(h2), [h1, h2]


@register_model("mlp")
def mnist_mlp(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, hidden: list = (784, 256)) -> MLP:
    """784 -> 784 -> 256 -> 10 on MNIST (input width follows the dataset)."""
    return MLP(in_chans * image_size * image_size, tuple(hidden), num_classes)
