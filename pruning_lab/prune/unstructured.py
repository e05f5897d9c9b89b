"""Unstructured pruning: the smallest weights of all convolutions and linear layers set to zero
(global magnitude, torch.nn.utils.prune), made permanent. The shapes stay: a dense kernel does the
same work on zeros, so this saves file size (weights stored packed), not time."""
from __future__ import annotations

import torch.nn as nn
from torch.nn.utils import prune


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights unstructured pruning considers, by the weight's name."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_unstructured(model: nn.Module, amount: float) -> list[str]:
    """Zero the fraction `amount` of all prunable weights with the smallest magnitude (zeros already there
    count), in place and permanent; return the names of the weights."""
    layers = prunable_weights(model)
    prune.global_unstructured([(m, "weight") for m in layers.values()], pruning_method=prune.L1Unstructured,
                              amount=amount)
    for m in layers.values():
        prune.remove(m, "weight")  # plain weights again: the zeros are in them
    return list(layers)


def sparsity(model: nn.Module, names: list[str]) -> float:
    """Fraction of zeros among the named weights."""
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    return sum(int((params[n] == 0).sum()) for n in names) / max(total, 1)


def layer_sparsity(model: nn.Module, names: list[str]) -> dict[str, float]:
    """Fraction of zeros in each named weight (global pruning spreads the zeros unevenly)."""
    params = dict(model.named_parameters())
    return {n: round(float((params[n] == 0).float().mean()), 4) for n in names}
