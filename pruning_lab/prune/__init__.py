"""Pruning: structured (channels, hidden units and heads removed for real, Torch-Pruning) and
unstructured (global magnitude, torch.nn.utils.prune), recorded in checkpoints as layer surgery."""
from .record import shape_changes
from .structured import IMPORTANCES, prunable, prune_structured, ratio_for_target
from .unstructured import prune_unstructured, sparsity

__all__ = ["IMPORTANCES", "prunable", "prune_structured", "prune_unstructured", "ratio_for_target", "shape_changes",
           "sparsity"]
